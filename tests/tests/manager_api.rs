//! The manager's REST API over plain HTTP (curl), against real engines and replicas:
//! every volume, snapshot, backup, job and setting action with the data checked by
//! tools no one here wrote (nbdcopy, qemu-img compare, fio --verify); bad input refused
//! with the field named and nothing written; the manager killed with -9 under fio and
//! started again (its volumes adopted, no I/O error); a SIGTERM with an event stream
//! open; the token rule beyond loopback.

use longhorn_tests::manager::{free_port, Manager};
use longhorn_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(test_root()).expect("temp dir")
}

/// Every file and directory under `dir`, for "nothing was written" checks.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if p.is_dir() {
            out.extend(tree(&p));
        }
    }
    out.sort();
    out
}

/// A request that must be refused with `status`; the error body must be the API's JSON
/// and, when `field` is given, name it.
fn refused(m: &Manager, method: &str, path: &str, body: Option<&Value>, status: u16, field: Option<&str>) -> Value {
    let (st, v) = m.call(method, path, body);
    assert_eq!(st, status, "{method} {path} {body:?}: want {status}, got {st} {v}");
    assert_eq!(v["type"], "error", "{method} {path}: the error is not the API's JSON: {v}");
    assert!(v["message"].as_str().is_some_and(|s| !s.is_empty()), "{method} {path}: no message: {v}");
    if let Some(f) = field {
        let got = v["field"].as_str().unwrap_or("");
        assert!(got == f || got.starts_with(&format!("{f}[")) || got.starts_with(&format!("{f}.")), "{method} {path}: field {got:?}, want {f}: {v}");
    }
    v
}

fn action(m: &Manager, vol: &str, act: &str, body: Value) -> Value {
    m.post(&format!("/v1/volumes/{vol}?action={act}"), &body)
}

fn names(list: &Value) -> Vec<String> {
    list["data"].as_array().into_iter().flatten().filter_map(|x| x["name"].as_str().map(String::from)).collect()
}

fn attached_healthy(v: &Value) -> bool {
    v["state"] == "attached" && v["robustness"] == "healthy"
}

#[test]
fn every_volume_snapshot_backup_and_job_action_over_http() {
    for tool in ["curl", "nbdcopy", "qemu-img"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tmp("lh-api-");
    let m = Manager::start(t.path());
    let src = t.path().join("src.bin");
    random_file(&src, 8 * MB);

    // --- bad input: refused, field named, nothing written ---
    let before = tree(&m.data);
    let vols = "/v1/volumes";
    for (body, field) in [
        (json!({"name": "v1", "size": 12345}), "size"),
        (json!({"name": "v1", "size": "ten gigs"}), "size"),
        (json!({"name": "v1"}), "size"),
        (json!({"name": "a/b", "size": "64Mi"}), "name"),
        (json!({"name": "..", "size": "64Mi"}), "name"),
        (json!({"name": "Caps", "size": "64Mi"}), "name"),
        (json!({"size": "64Mi"}), "name"),
        (json!({"name": "v1", "size": "64Mi", "numberOfReplicas": 0}), "numberOfReplicas"),
        (json!({"name": "v1", "size": "64Mi", "numberOfReplicas": "many"}), "numberOfReplicas"),
        (json!({"name": "v1", "size": "64Mi", "staleReplicaTimeout": -1}), "staleReplicaTimeout"),
        (json!({"name": "v1", "size": "64Mi", "accessMode": "ReadOnlyMany"}), "accessMode"),
        (json!({"name": "v1", "size": "64Mi", "frontend": "iscsi"}), "frontend"),
        (json!({"name": "v1", "size": "64Mi", "replicas": 3}), "replicas"),
        (json!({"name": "v1", "size": "64Mi", "recurringJobs": [{"name": "ninechars", "task": "snapshot", "cron": "* * * * *", "retain": 1}]}), "recurringJobs"),
        (json!({"name": "v1", "size": "64Mi", "recurringJobs": [{"name": "s", "task": "snapshot", "cron": "61 * * * *", "retain": 1}]}), "recurringJobs"),
        (json!({"name": "v1", "size": "64Mi", "recurringJobs": [{"name": "s", "task": "clone", "cron": "* * * * *", "retain": 1}]}), "recurringJobs"),
        (json!({"name": "v1", "size": "64Mi", "fromBackup": "not a url"}), "fromBackup"),
        (json!({"name": "v1", "size": "64Mi", "dataLocality": "nearby"}), "dataLocality"),
        (json!({"name": "v1", "size": "64Mi", "dataLocality": "strict-local", "numberOfReplicas": 2}), "dataLocality"),
    ] {
        refused(&m, "POST", vols, Some(&body), 400, Some(field));
    }
    // Within the 64 TiB the API takes, but more than ext4 (these machines' disk) holds
    // in one file: refused at create, not at the first attach.
    let (st, text) = m.call_raw("POST", vols, Some(&json!({"name": "v1", "size": "20Ti"}).to_string()), &[]);
    assert_eq!(st, 400, "a 20 TiB volume on ext4: {text}");
    assert!(text.contains("21990232555520") && text.contains("holds no file that large"), "the refusal names the size: {text}");
    // Not JSON, the wrong content type, too large, unknown routes and methods.
    let (st, text) = m.call_raw("POST", vols, Some("{not json"), &[]);
    assert_eq!(st, 400, "a body that is not JSON: {text}");
    let (st, text) = m.call_raw("POST", vols, None, &["-H", "Content-Type: text/plain", "--data-binary", "{}"]);
    assert_eq!(st, 415, "text/plain: {text}");
    let big = format!("{{\"name\":\"v1\",\"size\":\"64Mi\",\"pad\":\"{}\"}}", "x".repeat(2 << 20));
    let big_file = t.path().join("big.json");
    std::fs::write(&big_file, big).expect("write");
    let (st, text) = m.call_raw("POST", vols, None, &["-H", "Content-Type: application/json", "--data-binary", &format!("@{}", big_file.display())]);
    assert_eq!(st, 413, "a 2 MiB body: {text}");
    refused(&m, "GET", "/v1/volumes/nope", None, 404, Some("name"));
    refused(&m, "DELETE", "/v1/volumes/nope", None, 404, Some("name"));
    refused(&m, "POST", "/v1/volumes/nope?action=attach", Some(&json!({})), 404, Some("name"));
    refused(&m, "GET", "/v1/volumes/..%2Fetc", None, 400, Some("name"));
    refused(&m, "GET", "/v1/nothing", None, 404, None);
    refused(&m, "PATCH", "/v1/volumes", Some(&json!({})), 405, None);
    refused(&m, "POST", "/", Some(&json!({})), 405, None);
    refused(&m, "GET", "/v1/volumes/%FF", None, 400, None);
    refused(&m, "PUT", "/v1/settings/backup-target", Some(&json!({"value": "ftp://x"})), 400, Some("value"));
    refused(&m, "PUT", "/v1/settings/no-such-setting", Some(&json!({"value": ""})), 404, Some("name"));
    refused(&m, "PUT", "/v1/secrets/s3", Some(&json!({"data": {"PASSWORD": "x"}})), 400, Some("data"));
    assert_eq!(tree(&m.data), before, "refused requests changed files under {}", m.data.display());

    // --- create, attach, data over NBD ---
    let v = m.post(vols, &json!({"name": "v1", "size": "64Mi", "numberOfReplicas": 2, "frontend": "", "disableFrontend": true}));
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["size"], (64 * MB).to_string(), "{v}");
    assert!(v["links"]["self"].as_str().is_some_and(|s| s.ends_with("/v1/volumes/v1")), "{v}");
    assert!(v["actions"]["attach"].is_string() && v["actions"]["snapshotCreate"].is_null(), "a detached volume's actions: {v}");
    refused(&m, "POST", vols, Some(&json!({"name": "v1", "size": "64Mi"})), 409, Some("name"));
    refused(&m, "POST", "/v1/volumes/v1?action=snapshotCreate", Some(&json!({})), 409, None);
    refused(&m, "POST", "/v1/volumes/v1?action=frobnicate", Some(&json!({})), 400, Some("action"));
    assert!(names(&m.get(vols)).contains(&"v1".to_string()));

    action(&m, "v1", "attach", json!({"disableFrontend": true}));
    let v = m.wait_volume("v1", 60, "attached and healthy", attached_healthy);
    assert!(v["actions"]["detach"].is_string() && v["actions"]["attach"].is_null(), "an attached volume's actions: {v}");
    assert_eq!(v["replicas"].as_array().map(|a| a.len()), Some(2), "{v}");
    refused(&m, "POST", "/v1/volumes/v1?action=attach", Some(&json!({})), 409, None);
    // clientAddress (the address a ReadWriteMany node mounts the share from) is checked
    // before anything else: it says which hosts may reach the volume's files.
    for bad in [json!({"clientAddress": "10.0.0.1"}), json!({"attachedBy": "n1", "clientAddress": "node-b"}), json!({"attachedBy": "n1", "clientAddress": "0.0.0.0"})] {
        refused(&m, "POST", "/v1/volumes/v1?action=attach", Some(&bad), 400, Some("clientAddress"));
    }
    // What a page of another site could make a browser send: an empty form post, a
    // cross-origin request, a DNS-rebound host name. Refused; the volume stays attached.
    let detach = "/v1/volumes/v1?action=detach";
    let (st, text) = m.call_raw("POST", detach, None, &["-H", "Content-Type: application/x-www-form-urlencoded", "--data-binary", ""]);
    assert_eq!(st, 415, "an empty form post: {text}");
    let (st, text) = m.call_raw("POST", detach, Some("{}"), &["-H", "Origin: http://evil.example"]);
    assert_eq!(st, 403, "a cross-origin post: {text}");
    let (st, text) = m.call_raw("GET", "/v1/volumes", None, &["-H", "Host: evil.example"]);
    assert_eq!(st, 403, "a foreign Host: {text}");
    assert_eq!(m.volume("v1")["state"], "attached");
    let nbd = m.nbd("v1");
    sh(&format!("nbdcopy '{}' '{nbd}'", src.display()));

    // --- snapshots ---
    let s = action(&m, "v1", "snapshotCreate", json!({"name": "s1", "labels": {"app": "db"}}));
    assert_eq!(s["name"], "s1", "{s}");
    assert_eq!(s["labels"]["app"], "db", "{s}");
    for d in m.data_paths("v1") {
        assert!(d.join("volume-snap-s1.img").exists(), "no volume-snap-s1.img in {}", d.display());
    }
    refused(&m, "POST", "/v1/volumes/v1?action=snapshotCreate", Some(&json!({"name": "../x"})), 400, Some("name"));
    refused(&m, "POST", "/v1/volumes/v1?action=snapshotCreate", Some(&json!({"labels": "x"})), 400, Some("labels"));
    let list = action(&m, "v1", "snapshotList", json!({}));
    let chain = names(&list);
    assert_eq!(chain.last().map(|s| s.as_str()), Some("volume-head"), "the chain ends in the head: {list}");
    assert!(chain.contains(&"s1".to_string()), "{list}");
    // Overwrite the start, then revert to s1: the volume holds the source again.
    sh(&format!("qemu-io -f raw -c 'write -P 0x11 0 1M' '{nbd}'"));
    let (same, _) = sh_try(&format!("qemu-img compare -f raw -F raw '{}' '{nbd}'", src.display()));
    assert!(!same, "the overwrite did not show");
    action(&m, "v1", "snapshotRevert", json!({"name": "s1"}));
    let head = t.path().join("head.bin");
    sh(&format!("nbdcopy '{nbd}' '{}'", head.display()));
    let (same, out) = sh_try(&format!("qemu-img compare -f raw -F raw '{}' '{}'", src.display(), head.display()));
    // The volume is 64 MiB, the source 8 MiB: compare's "image sizes differ" with the rest zero is a match.
    assert!(same || out.contains("Images are identical") || out.contains("size"), "after revert to s1: {out}");
    sh(&format!("cmp -n {} '{}' '{}'", 8 * MB, src.display(), head.display()));
    refused(&m, "POST", "/v1/volumes/v1?action=snapshotRevert", Some(&json!({"name": "nosuch"})), 404, None);
    action(&m, "v1", "snapshotCreate", json!({"name": "s2"}));
    action(&m, "v1", "snapshotDelete", json!({"name": "s2"}));
    action(&m, "v1", "snapshotPurge", json!({}));
    // As in Longhorn: a removed snapshot whose child is the head stays in the chain,
    // marked removed, until a later snapshot lets it be merged.
    let list = action(&m, "v1", "snapshotList", json!({}));
    let chain = names(&list);
    assert_eq!(chain.iter().filter(|n| *n == "volume-head").count(), 1, "{list}");
    let s2 = list["data"].as_array().and_then(|a| a.iter().find(|x| x["name"] == "s2")).cloned();
    assert!(s2.as_ref().is_none_or(|x| x["removed"] == true), "s2 after delete and purge: {list}");

    // --- recurring jobs ---
    refused(&m, "POST", "/v1/volumes/v1?action=recurringJobAdd", Some(&json!({"jobs": [{"name": "ninechars", "task": "snapshot", "cron": "* * * * *", "retain": 1}]})), 400, Some("jobs"));
    let bad = refused(&m, "POST", "/v1/volumes/v1?action=recurringJobAdd", Some(&json!({"jobs": [{"name": "snap", "task": "snapshot", "cron": "61 * * * *", "retain": 1}]})), 400, Some("jobs"));
    assert_eq!(bad["field"], "jobs[0].cron", "{bad}");
    action(&m, "v1", "recurringJobAdd", json!({"jobs": [{"name": "snap", "task": "snapshot", "cron": "*/5 * * * *", "retain": 2, "labels": {"k": "v"}}]}));
    let jobs = action(&m, "v1", "recurringJobList", json!({}));
    assert_eq!(names(&jobs), vec!["snap"], "{jobs}");
    assert!(jobs["data"][0]["nextRun"].as_str().is_some_and(|s| !s.is_empty()), "the engine's schedule shows: {jobs}");
    let state_file = m.data.join("manager").join("volumes").join("v1.json");
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state file")).expect("state JSON");
    assert_eq!(st["recurringJobs"][0]["name"], "snap", "the job is kept on disk: {st}");
    action(&m, "v1", "recurringJobDelete", json!({"name": "snap"}));
    assert!(names(&action(&m, "v1", "recurringJobList", json!({}))).is_empty());
    refused(&m, "POST", "/v1/volumes/v1?action=recurringJobDelete", Some(&json!({"name": "snap"})), 404, Some("name"));

    // --- backups: target, backup, list, restore into a new volume, compare, delete ---
    refused(&m, "POST", "/v1/volumes/v1?action=snapshotBackup", Some(&json!({})), 409, None);
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    let target = format!("file://{}", store.display());
    let sv = m.call("PUT", "/v1/settings/backup-target", Some(&json!({"value": target})));
    assert_eq!(sv.0, 200, "{sv:?}");
    assert_eq!(m.get("/v1/settings/backup-target")["value"], target.as_str());
    let b = action(&m, "v1", "snapshotBackup", json!({"name": "s1", "labels": {"why": "test"}}));
    let bname = b["backup"].as_str().expect("a backup name").to_string();
    m.wait_volume("v1", 60, "done backing up", |v| {
        v["backupStatus"].as_array().into_iter().flatten().any(|x| x["id"] == bname.as_str() && x["state"] == "Completed")
    });
    let v = m.volume("v1");
    assert_eq!(v["lastBackup"], bname.as_str(), "{v}");
    assert!(v["lastBackupAt"].as_str().is_some_and(|s| s.ends_with('Z')), "lastBackupAt: {v}");
    let bvs = m.get("/v1/backupvolumes");
    assert_eq!(names(&bvs), vec!["v1"], "{bvs}");
    assert_eq!(bvs["data"][0]["lastBackupName"], bname.as_str(), "{bvs}");
    let bl = m.post("/v1/backupvolumes/v1?action=backupList", &json!({}));
    let url = bl["data"].as_array().and_then(|a| a.iter().find(|x| x["name"] == bname.as_str())).map(|x| x["url"].clone()).expect("the backup is listed");
    let got = m.post("/v1/backupvolumes/v1?action=backupGet", &json!({"name": bname}));
    assert_eq!(got["snapshotName"], "s1", "{got}");
    assert_eq!(got["state"], "Completed", "{got}");
    refused(&m, "POST", "/v1/backupvolumes/v1?action=backupGet", Some(&json!({"name": "backup-nosuch"})), 404, Some("name"));
    refused(&m, "GET", "/v1/backupvolumes/nosuch", None, 404, Some("name"));
    refused(&m, "POST", vols, Some(&json!({"name": "v2", "fromBackup": url, "size": "128Mi"})), 400, Some("size"));
    m.post(vols, &json!({"name": "v2", "fromBackup": url, "numberOfReplicas": 1, "frontend": "", "disableFrontend": true}));
    m.wait_volume("v2", 120, "restored", |v| v["state"] == "detached");
    action(&m, "v2", "attach", json!({}));
    m.wait_volume("v2", 60, "attached and healthy", attached_healthy);
    let (a, b2) = (m.nbd("v1"), m.nbd("v2"));
    let (same, out) = sh_try(&format!("qemu-img compare -f raw -F raw '{a}' '{b2}'"));
    assert!(same, "the restore differs from its source: {out}");
    m.post("/v1/backupvolumes/v1?action=backupDelete", &json!({"name": bname}));
    assert!(names(&m.post("/v1/backupvolumes/v1?action=backupList", &json!({}))).is_empty());

    // --- replicas: fewer while attached, more at the next attach ---
    let dirs = m.data_paths("v1");
    action(&m, "v1", "updateReplicaCount", json!({"replicaCount": 1}));
    let v = m.wait_volume("v1", 60, "down to one RW replica", |v| v["replicas"].as_array().is_some_and(|r| r.len() == 1 && r[0]["mode"] == "RW"));
    assert_eq!(v["numberOfReplicas"], 1, "{v}");
    let t0 = Instant::now();
    while dirs[1].exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dirs[1].exists(), "{} is still there", dirs[1].display());
    refused(&m, "POST", "/v1/volumes/v1?action=updateReplicaCount", Some(&json!({"replicaCount": 0})), 400, Some("replicaCount"));
    refused(&m, "POST", "/v1/volumes/v1?action=replicaRemove", Some(&json!({"name": "v1-r-9"})), 404, Some("name"));
    refused(&m, "POST", "/v1/volumes/v1?action=replicaRemove", Some(&json!({"name": "other-r-0"})), 400, Some("name"));
    action(&m, "v1", "detach", json!({}));
    m.wait_volume("v1", 60, "detached", |v| v["state"] == "detached");
    // Detached, nothing says which replica is current: removing one is refused.
    refused(&m, "POST", "/v1/volumes/v1?action=replicaRemove", Some(&json!({"name": "v1-r-0"})), 409, None);
    assert!(dirs[0].exists(), "{} was removed", dirs[0].display());
    action(&m, "v1", "updateReplicaCount", json!({"replicaCount": 2}));
    action(&m, "v1", "attach", json!({}));
    m.wait_volume("v1", 120, "healthy with two replicas again", |v| {
        attached_healthy(v) && v["replicas"].as_array().is_some_and(|r| r.len() == 2 && r.iter().all(|x| x["mode"] == "RW"))
    });
    let back = t.path().join("back.bin");
    sh(&format!("nbdcopy '{}' '{}'", m.nbd("v1"), back.display()));
    sh(&format!("cmp -n {} '{}' '{}'", 8 * MB, src.display(), back.display()));

    // --- every action the document names refuses a body field of the wrong type or
    // one it does not take, whether or not it reads a body (the fuzzer found
    // recurringJobList taking {"undo": -2.8e16}) ---
    let doc = m.get("/v1/openapi.json");
    let acts = doc["paths"]["/v1/volumes/{name}"]["post"]["parameters"][0]["schema"]["enum"].as_array().cloned().unwrap_or_default();
    assert!(acts.len() > 10, "the document's volume actions: {acts:?}");
    for a in acts.iter().filter_map(|a| a.as_str()) {
        refused(&m, "POST", &format!("/v1/volumes/v1?action={a}"), Some(&json!({"undo": -2.5e16})), 400, Some("undo"));
    }

    // --- delete: replicas' directories and the state file gone ---
    let dirs = m.data_paths("v2");
    m.call("DELETE", "/v1/volumes/v2", None);
    refused(&m, "GET", "/v1/volumes/v2", None, 404, Some("name"));
    assert!(dirs.iter().all(|d| !d.exists()), "replica dirs left after delete: {dirs:?}");
    assert!(!m.data.join("manager").join("volumes").join("v2.json").exists(), "the state file is left");
}

/// The manager is only the control plane: killed with -9 while fio writes and
/// verifies over NBD, the volume keeps serving; a new manager adopts the running
/// `longhorn up` (same pid) and answers for it. `up` killed alone is replaced (what it
/// left running stopped first); with every process of the volume gone too (a host
/// crash), the next manager starts it again on its data.
#[test]
fn a_manager_killed_under_fio_adopts_its_volumes_and_restarts_dead_ones() {
    assert!(have("fio"), "fio is not installed (tests/run installs it)");
    let t = tmp("lh-adopt-");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut m = Manager::start_on(t.path(), &listen, "manager-1.log");
    m.post("/v1/volumes", &json!({"name": "fv", "size": "128Mi", "numberOfReplicas": 2, "frontend": "", "disableFrontend": true}));
    action(&m, "fv", "attach", json!({}));
    m.wait_volume("fv", 60, "attached and healthy", attached_healthy);
    let uri = m.nbd("fv");
    let pid0 = read_state(&m, "fv")["pid"].as_i64().expect("a pid in the state file");
    action(&m, "fv", "snapshotCreate", json!({"name": "before"}));

    let job = format!(
        "--name=w --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=8 --size=64M --verify=crc32c --verify_fatal=1 --rate_iops=3000"
    );
    let load = std::thread::spawn(move || fio(&job));
    std::thread::sleep(Duration::from_secs(2));
    m.cleanup = false;
    m.proc.kill9();
    std::thread::sleep(Duration::from_secs(1));
    let m2 = Manager::start_on(t.path(), &listen, "manager-2.log");
    let v = m2.wait_volume("fv", 30, "attached and healthy under the new manager", attached_healthy);
    assert_eq!(read_state(&m2, "fv")["pid"].as_i64(), Some(pid0), "the running longhorn up was not adopted: {v}");
    // A second manager on the same directories is refused (it would restart the same
    // volumes and stop the first one's processes).
    let other = Command::new(bin())
        .args(["manager", "serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&m2.data)
        .arg("--run-dir")
        .arg(&m2.run)
        .output()
        .expect("run a second manager");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && err.contains("another manager"), "a second manager on the same state: {err}");
    let snaps = names(&action(&m2, "fv", "snapshotList", json!({})));
    assert!(snaps.contains(&"before".to_string()), "the new manager does not show the snapshot: {snaps:?}");
    let (ok, errs, out) = load.join().expect("fio thread");
    assert!(ok && errs == 0, "fio across the manager's kill -9: {out}");
    // What fio wrote, for the restart below.
    let img = t.path().join("before.bin");
    sh(&format!("nbdcopy '{uri}' '{}'", img.display()));

    // `up` alone killed: its engine and replicas outlive it; the manager stops them
    // cleanly and starts a new `up` on the same data.
    sh(&format!("kill -9 {pid0}"));
    let t0 = Instant::now();
    let pid1 = loop {
        let p = read_state(&m2, "fv")["pid"].as_i64();
        let v = m2.volume("fv");
        if p.is_some() && p != Some(pid0) && attached_healthy(&v) && std::path::Path::new(&format!("/proc/{}", p.unwrap_or(0))).exists() {
            break p.unwrap_or(0);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no new longhorn up after kill -9 of {pid0}: {v}\n{}", m2.log_tail());
        std::thread::sleep(Duration::from_millis(250));
    };
    let again = t.path().join("again.bin");
    sh(&format!("nbdcopy '{uri}' '{}'", again.display()));
    sh(&format!("cmp '{}' '{}'", img.display(), again.display()));

    // A host crash: the manager and every process of the volume die at once.
    let mut m2 = m2;
    m2.cleanup = false;
    m2.proc.kill9();
    let pids = volume_pids(t.path());
    assert!(pids.len() >= 3, "up, engine and replicas: {pids:?}");
    sh(&format!("kill -9 {}", pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")));
    let t0 = Instant::now();
    while !volume_pids(t.path()).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let m3 = Manager::start_on(t.path(), &listen, "manager-3.log");
    m3.wait_volume("fv", 90, "restarted and healthy", attached_healthy);
    let pid3 = read_state(&m3, "fv")["pid"].as_i64();
    assert!(pid3.is_some() && pid3 != Some(pid1), "a new longhorn up serves the volume");
    let after = t.path().join("after.bin");
    sh(&format!("nbdcopy '{}' '{}'", m3.nbd("fv"), after.display()));
    sh(&format!("cmp '{}' '{}'", img.display(), after.display()));
}

fn read_state(m: &Manager, name: &str) -> Value {
    let p = m.data.join("manager").join("volumes").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).expect("state file")).expect("state JSON")
}

/// Processes but the manager whose command line names a path under `dir` (the
/// volume's `up`, engine and replicas all do).
fn volume_pids(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else { continue };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if c.contains(&needle) && !c.contains("manager serve") && !zombie {
            out.push(pid);
        }
    }
    out
}

/// SIGTERM with an event stream open: the manager ends the stream and exits at once;
/// its volume keeps serving.
#[test]
fn sigterm_with_an_event_stream_open_stops_the_manager_but_not_its_volumes() {
    let t = tmp("lh-term-");
    let mut m = Manager::start(t.path());
    m.post("/v1/volumes", &json!({"name": "tv", "size": "16Mi", "numberOfReplicas": 1, "frontend": "", "disableFrontend": true}));
    action(&m, "tv", "attach", json!({}));
    m.wait_volume("tv", 60, "attached and healthy", attached_healthy);
    let uri = m.nbd("tv");
    let mut stream = Command::new("curl")
        .args(["-s", "-N", "-m", "120", &format!("{}/v1/events", m.url)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl events");
    std::thread::sleep(Duration::from_millis(500));
    m.cleanup = false;
    let t0 = Instant::now();
    assert!(m.proc.term(), "the manager did not exit 0 on SIGTERM: {}", m.log_tail());
    let took = t0.elapsed();
    // The stream closed (curl ends) rather than hanging until its own timeout.
    let t1 = Instant::now();
    let ended = loop {
        if let Ok(Some(_)) = stream.try_wait() {
            break true;
        }
        if t1.elapsed() > Duration::from_secs(10) {
            let _ = stream.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    if let Some(mut o) = stream.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    let _ = stream.wait();
    assert!(ended, "the event stream stayed open after the manager stopped");
    assert!(out.contains("\"type\":\"volume\"") && out.contains("\"id\":\"tv\""), "the stream sent the volume first: {out}");
    eprintln!("[manager] SIGTERM to exit with a stream open: {:.2} s", took.as_secs_f64());
    // The volume outlives its manager; a new one adopts and deletes it.
    sh(&format!("qemu-io -f raw -c 'write -P 0x42 0 64k' -c 'read -P 0x42 0 64k' '{uri}'"));
    let m2 = Manager::start(t.path());
    m2.wait_volume("tv", 30, "adopted", attached_healthy);
}

/// Beyond loopback the API needs a token: without one the manager refuses to start;
/// with one, requests without it get 401 and the UI's files stay open.
#[test]
fn beyond_loopback_the_api_needs_a_token() {
    let t = tmp("lh-token-");
    let data = t.path().join("data");
    let run = t.path().join("run");
    let listen = format!("127.0.0.2:{}", free_port());
    let args = |extra: &[&str]| {
        let mut a = vec!["manager", "serve", "--listen", &listen, "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8")];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let o = Command::new(bin()).args(args(&[])).output().expect("run manager");
    assert!(!o.status.success(), "a manager on {listen} without a token started");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--token-file"), "the refusal names --token-file: {err}");
    let tok = t.path().join("token");
    std::fs::write(&tok, "short\n").expect("write");
    let o = Command::new(bin()).args(args(&["--token-file", tok.to_str().expect("utf8")])).output().expect("run manager");
    assert!(!o.status.success(), "a 5-character token was taken");
    std::fs::write(&tok, "s3cr3t-t0ken-of-some-length\n").expect("write");
    let a = args(&["--token-file", tok.to_str().expect("utf8")]);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let (_p, url) = spawn(&a, &t.path().join("manager.log"), "listening").expect("manager with a token");
    let code = |extra: &str, path: &str| sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' {extra} '{url}{path}'")).trim().to_string();
    assert_eq!(code("", "/v1/volumes"), "401");
    assert_eq!(code("-H 'Authorization: Bearer wrong-token-of-some-length'", "/v1/volumes"), "401");
    assert_eq!(code("", "/metrics"), "401");
    assert_eq!(code("-H 'Authorization: Bearer s3cr3t-t0ken-of-some-length'", "/v1/volumes"), "200");
    assert_eq!(code("", "/healthz"), "200");
    assert_eq!(code("", "/"), "200");
}

/// `--tls-cert`/`--tls-key`: the API over HTTPS. curl and the operator CLI trusting the
/// CA get through (with the token); a client that does not trust it, or speaks plain
/// HTTP, gets nothing; a peer that connects and never finishes its handshake holds up
/// no one else; a bad certificate stops the manager at start, naming the file.
#[test]
fn https_with_the_operators_ca() {
    use longhorn_tests::manager::make_certs;
    let t = tmp("lh-tls-");
    let data = t.path().join("data");
    let run = t.path().join("run");
    let port = free_port();
    let listen = format!("127.0.0.2:{port}");
    let certs = make_certs(&t.path().join("tls"), "longhorn test CA", &["127.0.0.2".to_string()]);
    let other = make_certs(&t.path().join("other"), "another CA", &["127.0.0.2".to_string()]);
    let tok = t.path().join("token");
    std::fs::write(&tok, "s3cr3t-t0ken-of-some-length\n").expect("write");
    let args = |cert: &Path, key: &Path| -> Vec<String> {
        [
            "manager", "serve", "--listen", &listen, "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8"),
            "--token-file", tok.to_str().expect("utf8"), "--tls-cert", cert.to_str().expect("utf8"), "--tls-key", key.to_str().expect("utf8"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // A certificate that is not one, and a key of another certificate: refused at start.
    let o = Command::new(bin()).args(args(&certs.key, &certs.key)).output().expect("run manager");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tls-cert"), "a key given as the certificate: {err}");
    let o = Command::new(bin()).args(args(&certs.cert, &other.key)).output().expect("run manager");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tls-key"), "another certificate's key: {err}");

    let a = args(&certs.cert, &certs.key);
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let (_p, url) = spawn(&a, &t.path().join("manager.log"), "listening").expect("manager with TLS");
    assert_eq!(url.trim(), format!("https://{listen}"), "it says it serves https");

    // Connected, silent: the accept loop must not wait on it.
    let silent = std::net::TcpStream::connect(&listen).expect("connect");
    let ca = certs.ca.display().to_string();
    let bearer = "-H 'Authorization: Bearer s3cr3t-t0ken-of-some-length'";
    let code = |extra: &str, u: &str| sh_try(&format!("curl -s -m 5 -o /dev/null -w '%{{http_code}}' {extra} '{u}'")).1.trim().to_string();
    assert_eq!(code(&format!("--cacert {ca} {bearer}"), &format!("{url}/v1/volumes")), "200");
    assert_eq!(code(&format!("--cacert {ca}"), &format!("{url}/v1/volumes")), "401", "the token is still asked for");
    assert_eq!(code(bearer, &format!("{url}/v1/volumes")), "000", "curl without the CA got an answer");
    let other_ca = other.ca.display().to_string();
    assert_eq!(code(&format!("--cacert {other_ca} {bearer}"), &format!("{url}/v1/volumes")), "000", "another CA was trusted");
    assert_eq!(code(bearer, &format!("http://{listen}/v1/volumes")), "000", "plain HTTP got an answer");
    drop(silent);

    // The operator CLI: with --ca it works, without it it says what is missing, with
    // the wrong CA it fails on the certificate.
    let cli = |extra: &[&str]| -> (bool, String) {
        let o = Command::new(bin())
            .args(["manager", "--url", &url, "--token-file", tok.to_str().expect("utf8")])
            .args(extra)
            .args(["volume", "ls"])
            .output()
            .expect("run longhorn manager");
        let mut s = String::from_utf8_lossy(&o.stdout).to_string();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.success(), s)
    };
    let (good, out) = cli(&["--ca", &ca]);
    assert!(good, "volume ls over https with --ca: {out}");
    let (good, out) = cli(&[]);
    assert!(!good && out.contains("--ca"), "without --ca: {out}");
    let (good, out) = cli(&["--ca", &other_ca]);
    assert!(!good && out.to_lowercase().contains("certificate"), "with another CA: {out}");
}

/// `longhorn manager volume|snapshot|job|setting|backup ...`: the operator CLI does over
/// the API what the UI does, and says what is wrong when the API refuses.
#[test]
fn the_operator_cli_drives_the_same_api() {
    let t = tmp("lh-cli-");
    let m = Manager::start(t.path());
    let cli = |args: &[&str]| -> (bool, String) {
        let o = Command::new(bin()).arg("manager").args(args).env("LONGHORN_MANAGER_URL", &m.url).output().expect("run longhorn manager");
        let mut s = String::from_utf8_lossy(&o.stdout).to_string();
        s.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.success(), s)
    };
    let ok = |args: &[&str]| -> String {
        let (good, out) = cli(args);
        assert!(good, "longhorn manager {args:?} failed:\n{out}");
        out
    };
    ok(&["volume", "create", "c1", "--size", "32Mi", "--replicas", "2"]);
    let (good, out) = cli(&["volume", "create", "c2", "--size", "12345"]);
    assert!(!good && out.contains("size") && out.contains("HTTP 400"), "a bad size: {out}");
    ok(&["volume", "attach", "c1", "--frontend", "none"]);
    m.wait_volume("c1", 60, "attached and healthy", attached_healthy);
    sh(&format!("qemu-io -f raw -c 'write -P 0x3c 0 1M' '{}'", m.nbd("c1")));
    ok(&["snapshot", "create", "c1", "cs1", "--label", "by=cli"]);
    let ls = ok(&["snapshot", "ls", "c1"]);
    assert!(ls.contains("cs1") && ls.contains("volume-head"), "{ls}");
    let (good, out) = cli(&["job", "add", "c1", r#"[{"name":"ninechars","task":"snapshot","cron":"* * * * *","retain":1}]"#]);
    assert!(!good && out.contains("name") && out.contains("HTTP 400"), "a 9-character job name: {out}");
    ok(&["job", "add", "c1", r#"[{"name":"snap","task":"snapshot","cron":"*/5 * * * *","retain":2}]"#]);
    assert!(ok(&["job", "ls", "c1"]).contains("*/5 * * * *"));
    let store = t.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    ok(&["setting", "set", "backup-target", &format!("file://{}", store.display())]);
    ok(&["snapshot", "backup", "c1", "cs1"]);
    m.wait_volume("c1", 60, "backed up", |v| v["backupStatus"].as_array().into_iter().flatten().any(|b| b["state"] == "Completed"));
    assert!(ok(&["backup", "volumes"]).contains("c1"));
    let list: Value = serde_json::from_str(&ok(&["--json", "backup", "ls", "c1"])).expect("backup ls --json");
    let url = list["data"][0]["url"].as_str().expect("a backup URL").to_string();
    ok(&["backup", "restore", &url, "c1r", "--replicas", "1"]);
    m.wait_volume("c1r", 60, "restored", |v| v["state"] == "detached");
    ok(&["volume", "attach", "c1r", "--frontend", "none"]);
    m.wait_volume("c1r", 60, "attached", attached_healthy);
    sh(&format!("qemu-io -f raw -c 'read -P 0x3c 0 1M' '{}'", m.nbd("c1r")));
    let vols: Value = serde_json::from_str(&ok(&["--json", "volume", "ls"])).expect("volume ls --json");
    assert_eq!(names(&vols), vec!["c1", "c1r"], "{vols}");
    ok(&["volume", "detach", "c1r"]);
    ok(&["volume", "delete", "c1r"]);
    let (good, out) = cli(&["volume", "get", "c1r"]);
    assert!(!good && out.contains("HTTP 404"), "{out}");
}

/// A volume with a filesystem mounted on its device (FUSE + loop here; the host has
/// no NBD or ublk driver): detach and delete are refused at once, naming the mount,
/// and work once it is unmounted; the filesystem checks clean.
#[test]
fn detach_of_a_mounted_volume_is_refused_at_once() {
    for tool in ["mkfs.ext4", "e2fsck", "mount", "umount"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tmp("lh-mnt-");
    let m = Manager::start(t.path());
    m.post("/v1/volumes", &json!({"name": "mv", "size": "64Mi", "numberOfReplicas": 1, "frontend": "fuse"}));
    let v = action(&m, "mv", "attach", json!({}));
    let dev = v["endpoint"].as_str().unwrap_or_default().to_string();
    assert!(dev.starts_with("/dev/longhorn/"), "no device: {v}");
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    sh(&format!("mkfs.ext4 -q '{dev}' && mount '{dev}' '{}' && echo hello > '{}/f' && sync", mnt.display(), mnt.display()));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = sh_try(&format!("umount '{}'", self.0.display()));
        }
    }
    let um = Unmount(mnt.clone());
    let e = refused(&m, "POST", "/v1/volumes/mv?action=detach", Some(&json!({})), 409, None);
    assert!(e["message"].as_str().is_some_and(|s| s.contains("mounted")), "{e}");
    refused(&m, "DELETE", "/v1/volumes/mv", None, 409, None);
    assert_eq!(m.volume("mv")["state"], "attached");
    drop(um);
    let (clean, out) = sh_try(&format!("e2fsck -fn '{dev}'"));
    assert!(clean, "e2fsck: {out}");
    action(&m, "mv", "detach", json!({}));
    assert_eq!(m.volume("mv")["state"], "detached");
}

/// dataLocality (Longhorn's parameter): best-effort serves replica-0 in the engine's
/// process (no replica process for it), strict-local the volume's only replica; the
/// data is the data either way, and the volume is healthy.
#[test]
fn data_locality_serves_a_replica_in_the_engine() {
    for tool in ["nbdcopy", "qemu-img", "pgrep"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tmp("lh-api-");
    let m = Manager::start(t.path());
    let src = t.path().join("src.bin");
    random_file(&src, 32 * MB);
    for (name, locality, n) in [("near", "best-effort", 2), ("only", "strict-local", 1)] {
        let v = m.post("/v1/volumes", &json!({"name": name, "size": "32Mi", "numberOfReplicas": n, "dataLocality": locality, "frontend": "", "disableFrontend": true}));
        assert_eq!(v["dataLocality"], locality, "{v}");
        action(&m, name, "attach", json!({"disableFrontend": true}));
        let v = m.wait_volume(name, 60, "attached and healthy", attached_healthy);
        assert_eq!(v["replicas"].as_array().map(|a| a.len()), Some(n), "{v}");
        let procs = |i: usize| sh(&format!("pgrep -f -- 'replica serve .*--dir {}$' || true", m.data.join(name).join(format!("replica-{i}")).display()));
        assert!(procs(0).trim().is_empty(), "{name}: replica-0 runs in the engine, not as a process: {}", procs(0));
        if n == 2 {
            assert!(!procs(1).trim().is_empty(), "{name}: replica-1 is a process of its own");
        }
        let nbd = m.nbd(name);
        sh(&format!("nbdcopy '{}' '{nbd}'", src.display()));
        sh(&format!("qemu-img compare -f raw -F raw '{}' '{nbd}'", src.display()));
        action(&m, name, "detach", json!({}));
        m.wait_volume(name, 60, "detached", |v| v["state"] == "detached");
    }
}

/// A replica kept for another host's engine holds the CSI controller's copy of its
/// volume's record (what a take-over from a lost host serves the volume from) and
/// gives back the volume's secret; a malformed copy is refused, naming the field, and
/// nothing of it is kept.
#[test]
fn a_replica_keeps_a_copy_of_its_volumes_record() {
    let t = tmp("lh-api-");
    let m = Manager::start(t.path());
    let secret = "ab".repeat(32);
    let r = m.post("/v1/replicas", &json!({"volume": "v9", "name": "r0", "size": "16Mi", "secret": secret}));
    assert_eq!(r["record"], Value::Null, "{r}");
    let path = "/v1/replicas/v9/r0?action=record";
    let good = json!({
        "owner": "host-a", "generation": 2, "size": "16777216", "numberOfReplicas": 3, "staleReplicaTimeout": 30,
        "accessMode": "rwo", "recurringJobs": [], "replicaAddresses": ["10.0.0.1:9600", "10.0.0.2:9600"], "healthyReplicas": ["10.0.0.1:9600"],
    });
    let mut bads = Vec::new();
    for (k, v) in [("owner", json!("")), ("generation", json!(-1)), ("numberOfReplicas", json!(0)), ("accessMode", json!("rox")),
                   ("replicaAddresses", json!(["nowhere"])), ("recurringJobs", json!([{"name": "c", "task": "clone", "cron": "* * * * *", "retain": 1}])), ("color", json!("red"))] {
        let mut b = good.clone();
        b[k] = v;
        bads.push(b);
    }
    let mut missing = good.clone();
    missing.as_object_mut().expect("object").remove("owner");
    bads.push(missing);
    for b in bads {
        refused(&m, "POST", path, Some(&json!({"record": b})), 400, Some("record"));
    }
    refused(&m, "POST", path, Some(&json!({})), 400, Some("record"));
    assert_eq!(m.get("/v1/replicas/v9/r0")["record"], Value::Null, "a refused copy was kept");
    let kept = m.post(path, &json!({"record": good}));
    assert_eq!(kept["record"], good, "{kept}");
    assert_eq!(m.get("/v1/replicas")["data"][0]["record"], good);
    let s = m.post("/v1/replicas/v9/r0?action=secret", &json!({}));
    assert_eq!((s["type"].as_str(), s["secret"].as_str()), (Some("volumeSecret"), Some(secret.as_str())), "{s}");
    refused(&m, "POST", "/v1/replicas/v9/r0?action=secret", Some(&json!({"x": 1})), 400, Some("x"));
    refused(&m, "POST", "/v1/replicas/v9/r0?action=steal", Some(&json!({})), 400, Some("action"));
    refused(&m, "POST", "/v1/replicas/v9/nope?action=secret", Some(&json!({})), 404, None);
}
