//! The manager's API against its own OpenAPI document: schemathesis (from PyPI, see
//! tests/run) generates requests from `GET /v1/openapi.json` and checks that no answer
//! is a server error, that every answer's status, content type and body are the ones
//! the document names, that what the document calls invalid is refused, and that a
//! method the document does not name is 405. The manager is real and so is its volume: one replica,
//! attached with the NBD export only, so the snapshot, backup and job actions reach a
//! real engine; a file:// backup target in the test directory holds one real backup.
//!
//! A hooks module steers the generated cases at those objects (most volume requests
//! name the attached volume, most action bodies keep the fields of their action),
//! keeps replica counts small, keeps every backup target URL on this machine, and never
//! deletes the attached volume (DELETE is fuzzed on other names). The run is bounded:
//! `--max-time` for schemathesis, `timeout` around it, one worker.

use longhorn_tests::manager::Manager;
use longhorn_tests::*;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const VOLUME: &str = "fuzz";
const SNAPSHOT: &str = "s1";

/// schemathesis's seconds for its phases; `timeout` kills it at FUZZ_SECS + 60.
const FUZZ_SECS: u64 = 60;

const HOOKS: &str = r#"
"""Steers schemathesis at the manager's real objects (tests/tests/manager_fuzz.rs)."""
import os
import random

import schemathesis

VOL = os.environ["LH_FUZZ_VOLUME"]
SNAP = os.environ["LH_FUZZ_SNAPSHOT"]
BACKUP = os.environ["LH_FUZZ_BACKUP"]
TARGET = os.environ["LH_FUZZ_TARGET"]

# The body fields each volume action takes (manager/src/api.rs); any other field is a
# 400 by design, so most cases keep only these, to get past the input checks.
FIELDS = {
    "attach": ["frontend", "disableFrontend", "hostId", "attachedBy", "attacherType", "clientAddress"],
    "snapshotCreate": ["name", "labels"],
    "snapshotBackup": ["name", "labels"],
    "snapshotGet": ["name"],
    "snapshotDelete": ["name"],
    "snapshotRevert": ["name"],
    "replicaRemove": ["name"],
    "recurringJobDelete": ["name"],
    "updateReplicaCount": ["replicaCount"],
    "recurringJobAdd": ["jobs"],
    "detach": [],
    "handOff": ["undo"],
    "replicaSecret": [],
    "replicaReplace": ["address", "newAddress"],
    "snapshotList": [],
    "snapshotPurge": [],
    "recurringJobList": [],
    "expand": ["size"],
}
SCHEMES = ("nfs://", "s3://", "file://", "vfs://")


def negative(case):
    meta = getattr(case, "meta", None)
    return meta is not None and str(meta.generation.mode) == "negative"


@schemathesis.hook
def map_case(context, case):
    path = case.operation.path
    method = case.operation.method.upper()
    params = dict(case.path_parameters or {})
    body = case.body if isinstance(case.body, dict) else None
    query = case.query if isinstance(case.query, dict) else {}
    action = query.get("action")
    if not isinstance(action, str):
        action = None
    # Steering for cases meant valid only: a case meant invalid stays as generated
    # (negative_data_rejection checks the server refuses it).
    steer = not negative(case)
    if path == "/v1/volumes/{name}":
        if method == "DELETE":
            # DELETE is fuzzed on other names only: the attached volume stays.
            if params.get("name") == VOL:
                params["name"] = VOL + "-gone"
        elif steer and random.random() < 0.85:
            params["name"] = VOL
        if steer and body is not None and action in FIELDS and random.random() < 0.8:
            body = {k: v for k, v in body.items() if k in FIELDS[action]}
        if steer and body is not None and action in ("snapshotGet", "snapshotDelete", "snapshotRevert") and random.random() < 0.3:
            body["name"] = SNAP
        if body is not None and action == "attach" and steer:
            # No block device on the test host: the NBD export only.
            body["disableFrontend"] = True
    if steer and path == "/v1/backupvolumes/{name}" and random.random() < 0.7:
        params["name"] = VOL
        if body is not None and random.random() < 0.3:
            body["name"] = BACKUP
    if body is not None and path == "/v1/replicas" and steer:
        # Replicas for other hosts' engines are real processes: two at most.
        body["volume"] = "fuzzrep"
        body["name"] = random.choice(["r1", "r2"])
    if body is not None and isinstance(body.get("replicaAddresses"), list):
        # An engine connects to these if the volume is ever attached: loopback only
        # (a port nothing listens on), never an address the generator made up.
        body["replicaAddresses"] = ["127.0.0.1:%d" % (9 + i) for i, _ in enumerate(body["replicaAddresses"][:32])]
        if isinstance(body.get("healthyReplicas"), list):
            body["healthyReplicas"] = body["replicaAddresses"][:1]
    if body is not None and action == "replicaReplace":
        for k in ("address", "newAddress"):
            if isinstance(body.get(k), str):
                body[k] = "127.0.0.1:19"
    if body is not None:
        # Few replica processes on a 2-core machine (what the server refuses anyway,
        # above 32, stays).
        for k in ("replicaCount", "numberOfReplicas"):
            n = body.get(k)
            if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 32:
                body[k] = 2
        # Backup targets stay on this machine: any URL becomes the test's directory.
        for k in ("value", "fromBackup"):
            v = body.get(k)
            if isinstance(v, str) and v.startswith(SCHEMES):
                body[k] = TARGET
    case.path_parameters = params
    if body is not None:
        case.body = body
    return case
"#;

fn schemathesis_version() -> Option<String> {
    let o = Command::new("schemathesis").arg("--version").output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn the_api_matches_its_openapi_document_under_fuzzing() {
    let version = schemathesis_version().expect("schemathesis is not installed (tests/run installs it from PyPI)");
    eprintln!("{version}");
    assert!(have("timeout"), "coreutils timeout is needed to bound the run");
    let tmp = tempfile::Builder::new().prefix("lh-fuzz-").tempdir_in(test_root()).expect("tempdir");
    let m = Manager::start(tmp.path());

    // The document is served and is OpenAPI 3.0 with the router's paths.
    let doc = m.get("/v1/openapi.json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.0")), "{doc}");
    for p in ["/v1/volumes", "/v1/volumes/{name}", "/v1/backupvolumes/{name}", "/v1/settings/{name}", "/v1/secrets/{name}", "/metrics"] {
        assert!(doc["paths"][p].is_object(), "the document lacks {p}");
    }

    // A real target, a real volume on a real engine, a snapshot and a backup of it.
    let backups = tmp.path().join("backups");
    std::fs::create_dir_all(&backups).expect("backups dir");
    let target = format!("file://{}", backups.display());
    let (st, set) = m.call("PUT", "/v1/settings/backup-target", Some(&json!({"value": target})));
    assert_eq!(st, 200, "{set}");
    assert_eq!(m.get("/v1/settings/backup-target")["value"], target.as_str());
    let spec = json!({"name": VOLUME, "size": 16 << 20, "numberOfReplicas": 1, "disableFrontend": true});
    m.post("/v1/volumes", &spec);
    let v = m.post(&format!("/v1/volumes/{VOLUME}?action=attach"), &json!({}));
    assert_eq!(v["state"], "attached", "{v}");
    m.post(&format!("/v1/volumes/{VOLUME}?action=snapshotCreate"), &json!({"name": SNAPSHOT}));
    let b = m.post(&format!("/v1/volumes/{VOLUME}?action=snapshotBackup"), &json!({"name": SNAPSHOT}));
    let backup = b["backup"].as_str().unwrap_or_default().to_string();
    assert!(backup.starts_with("backup-"), "{b}");
    m.wait_volume(VOLUME, 60, "backed up", |v| v["backupStatus"].as_array().is_some_and(|a| a.iter().any(|s| s["state"] == "Completed")));

    let hooks_dir = tmp.path().join("hooks");
    std::fs::create_dir_all(&hooks_dir).expect("hooks dir");
    std::fs::write(hooks_dir.join("lh_fuzz_hooks.py"), HOOKS).expect("hooks module");
    let url = m.url.clone();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let t = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "5", &(FUZZ_SECS + 60).to_string(), "schemathesis", "--no-color", "run"])
        .arg(format!("{url}/v1/openapi.json"))
        .args(["--url", &url, "--workers", "1", "--max-examples", "25", "--max-time", &FUZZ_SECS.to_string()])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,negative_data_rejection,unsupported_method"])
        // An endless stream by design: not a request/response operation.
        .args(["--exclude-path", "/v1/events"])
        // The UI's files are the router's fallback, where another method is 404, not 405
        // (lib.rs's not_found answers 404 there to any method but GET).
        .args(["--exclude-path", "/"])
        .args(["--request-timeout", "30", "--suppress-health-check", "all", "--generation-database", "none"])
        .current_dir(tmp.path())
        .env("SCHEMATHESIS_HOOKS", "lh_fuzz_hooks")
        .env("PYTHONPATH", &hooks_dir)
        .env("LH_FUZZ_VOLUME", VOLUME)
        .env("LH_FUZZ_SNAPSHOT", SNAPSHOT)
        .env("LH_FUZZ_BACKUP", &backup)
        .env("LH_FUZZ_TARGET", &target)
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("running schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    eprintln!("schemathesis: {:?} in {:.1} s", out.status, t.elapsed().as_secs_f64());
    assert!(t.elapsed() < Duration::from_secs(FUZZ_SECS + 65), "schemathesis overran its budget");
    assert!(out.status.success(), "schemathesis reports failures ({:?}); output above; manager log:\n{}", out.status, m.log_tail());
    assert!(text.contains("passed"), "schemathesis ran no test: output above");

    // The manager and its volume came through: the volume is there, and once attached
    // (a fuzzed detach may have stopped it) its engine answers.
    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "the manager panicked:\n{log}");
    let v = m.volume(VOLUME);
    if v["state"] == "detached" {
        m.post(&format!("/v1/volumes/{VOLUME}?action=attach"), &json!({"disableFrontend": true}));
    }
    m.wait_volume(VOLUME, 60, "attached", |v| v["state"] == "attached");
    let snaps = m.post(&format!("/v1/volumes/{VOLUME}?action=snapshotList"), &json!({}));
    assert!(snaps["data"].as_array().is_some_and(|a| a.iter().any(|s| s["name"] == "volume-head")), "{snaps}");
}
