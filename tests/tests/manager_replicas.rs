//! Replicas a manager keeps for other hosts' engines (`/v1/replicas`), and a volume
//! recorded by another manager over them: the engine never starts on a replica that
//! fell behind while none of those with the newest data answers (it would rebuild
//! the current ones from the stale one and lose acknowledged writes).

use longhorn_tests::manager::Manager;
use longhorn_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The pid of the `replica serve` process on `dir`.
fn replica_pid(dir: &str) -> i32 {
    // [r]: the pattern does not match the shell that runs pgrep.
    let out = sh(&format!("pgrep -f -- '[r]eplica serve .*--dir {dir}( |$)' | head -1"));
    out.trim().parse().unwrap_or_else(|_| panic!("no replica process on {dir}"))
}

fn signal(pid: i32, sig: &str) {
    sh(&format!("kill -{sig} {pid}"));
}

#[test]
fn an_attach_waits_for_a_replica_with_the_newest_data() {
    for tool in ["qemu-io", "qemu-img", "pgrep", "nbdinfo"] {
        assert!(have(tool), "{tool} is not installed (tests/run installs it)");
    }
    let t = tempfile::Builder::new().prefix("lh-reps-").tempdir_in(test_root()).expect("temp dir");
    let base = std::fs::canonicalize(t.path()).expect("the test directory");
    std::fs::create_dir_all(base.join("owner")).expect("mkdir");
    std::fs::create_dir_all(base.join("keeper")).expect("mkdir");
    let owner = Manager::start(&base.join("owner"));
    let mut keeper = Manager::start(&base.join("keeper"));
    let secret = sh("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").trim().to_string();
    assert_eq!(secret.len(), 64);

    // Bad requests change nothing.
    for (body, field) in [
        (json!({"volume": "v", "name": "r0", "size": "32Mi", "secret": "xyz"}), "secret"),
        (json!({"volume": "../v", "name": "r0", "size": "32Mi", "secret": secret}), "volume"),
        (json!({"volume": "v", "name": "r0", "size": "1000", "secret": secret}), "size"),
        (json!({"volume": "v", "name": "r0", "size": "32Mi", "secret": secret, "dir": "/etc"}), "dir"),
    ] {
        let (st, v) = keeper.call("POST", "/v1/replicas", Some(&body));
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| m.contains(field)), "{body}: {v}");
    }
    assert!(keeper.get("/v1/replicas")["data"].as_array().is_some_and(|a| a.is_empty()));

    let mut addrs = Vec::new();
    for r in ["r0", "r1", "r2"] {
        let v = keeper.post("/v1/replicas", &json!({"volume": "v", "name": r, "size": "32Mi", "secret": secret}));
        assert_eq!(v["running"], true, "{v}");
        addrs.push(v["address"].as_str().expect("address").to_string());
    }
    // The same again answers the same replica; another size or secret is refused.
    let again = keeper.post("/v1/replicas", &json!({"volume": "v", "name": "r0", "size": "32Mi", "secret": secret}));
    assert_eq!(again["address"], addrs[0].as_str());
    assert_eq!(keeper.call("POST", "/v1/replicas", Some(&json!({"volume": "v", "name": "r0", "size": "64Mi", "secret": secret}))).0, 409);
    let other = "ab".repeat(32);
    assert_eq!(keeper.call("POST", "/v1/replicas", Some(&json!({"volume": "v", "name": "r3", "size": "32Mi", "secret": other}))).0, 409);

    owner.post(
        "/v1/volumes",
        &json!({"name": "v", "size": "32Mi", "replicaAddresses": addrs, "secret": secret, "frontend": "", "disableFrontend": true}),
    );
    owner.post("/v1/volumes/v?action=attach", &json!({}));
    owner.wait_volume("v", 60, "healthy, its 3 replicas current", |v| {
        v["robustness"] == "healthy" && v["healthyReplicas"].as_array().is_some_and(|a| a.len() == 3)
    });
    let uri = owner.nbd("v");
    sh(&format!("qemu-io -f raw -c 'write -P 0x11 0 4M' '{uri}'"));

    // r2 stops answering; writes go on to r0 and r1 only.
    let kdata = keeper.data.clone();
    let dir = |r: &str| kdata.join(".replicas/v/data").join(r).display().to_string();
    let r2 = replica_pid(&dir("r2"));
    signal(r2, "STOP");
    let written = std::thread::spawn({
        let uri = uri.clone();
        move || sh_try(&format!("qemu-io -f raw -c 'write -P 0x22 0 4M' -c 'flush' '{uri}'"))
    });
    owner.wait_volume("v", 60, "degraded, r2 behind", |v| {
        v["robustness"] == "degraded" && v["healthyReplicas"].as_array().is_some_and(|a| a.len() == 2 && !a.iter().any(|x| x == addrs[2].as_str()))
    });
    let (ok, out) = written.join().expect("the writer");
    assert!(ok, "the write failed with one replica stopped: {out}");
    owner.post("/v1/volumes/v?action=detach", &json!({}));
    signal(r2, "CONT");

    // Now only the one that fell behind answers: the volume is not started on it.
    keeper.proc.kill9();
    for r in ["r0", "r1"] {
        signal(replica_pid(&dir(r)), "KILL");
    }
    let (st, v) = owner.call("POST", "/v1/volumes/v?action=attach", Some(&json!({})));
    assert_eq!(st, 409, "attached on the replica that fell behind: {v}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("newest data")), "{v}");
    assert_eq!(owner.volume("v")["state"], "detached");

    // With its manager back (it starts r0 and r1 again on their data), it attaches and
    // holds what was written last.
    keeper.cleanup = false;
    drop(keeper);
    let keeper = Manager::start_on(&base.join("keeper"), &format!("127.0.0.1:{}", longhorn_tests::manager::free_port()), "manager2.log");
    wait_for("r0 and r1 running again", Duration::from_secs(30), || {
        keeper.get("/v1/replicas")["data"].as_array().is_some_and(|a| a.iter().filter(|r| r["running"] == true).count() == 3)
    });
    owner.post("/v1/volumes/v?action=attach", &json!({}));
    owner.wait_volume("v", 60, "healthy again", |v| v["robustness"] == "healthy");
    let uri = owner.nbd("v");
    let (ok, out) = sh_try(&format!("qemu-io -f raw -c 'read -P 0x22 0 4M' '{uri}'"));
    assert!(ok && !out.contains("Pattern verification failed"), "the last write is lost: {out}");
    owner.post("/v1/volumes/v?action=detach", &json!({}));
    let _: Value = owner.call("DELETE", "/v1/volumes/v", None).1;
    for r in ["r0", "r1", "r2"] {
        let (st, v) = keeper.call("DELETE", &format!("/v1/replicas/v/{r}"), None);
        assert_eq!(st, 200, "{v}");
    }
    assert!(!keeper.data.join(".replicas/v").exists(), "the volume's replicas left files behind");
    let (left, ps) = sh_try(&format!("pgrep -af -- '[r]eplica serve .*{}'", keeper.data.join(".replicas/v/data").display()));
    assert!(!left, "a deleted replica's process still runs: {ps}");
}
