//! `longhorn up` brings failed replicas back by itself while fio writes and verifies:
//! a replica killed (-9), a replica hung (SIGSTOP, dropped by the engine's I/O
//! timeout), a replica whose directory is ruined (restarts fail until
//! staleReplicaTimeout, then it is rebuilt from scratch), and a replica the operator
//! removes (stopped, not brought back). At the end every replica left holds exactly
//! the volume's content.

use longhorn_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn replicas(run: &Path) -> Vec<Value> {
    let o = Command::new(bin()).args(["replica", "ls", "-v", "vol1", "--json"]).env("LONGHORN_RUN_DIR", run).output().expect("cli");
    serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// The pid of the replica process serving `dir`, if one runs.
fn try_replica_pid(dir: &Path) -> Option<i32> {
    let out = sh(&format!("pgrep -f -- 'replica serve .*--dir {}$' || true", dir.display()));
    out.lines().next().and_then(|l| l.trim().parse().ok())
}

fn replica_pid(dir: &Path) -> i32 {
    try_replica_pid(dir).unwrap_or_else(|| panic!("no replica process for {}", dir.display()))
}

/// Waits until the volume has `n` replicas, all RW, and `dir` is served by a process
/// other than `old_pid` (followed by process, not address: a replica on a unix socket
/// keeps its address across a restart).
fn wait_healthy(run: &Path, n: usize, dir: &Path, old_pid: i32, up: &Proc, what: &str) -> Duration {
    let t = Instant::now();
    loop {
        let ls = replicas(run);
        let rw = ls.iter().filter(|r| r["mode"] == "RW").count();
        let replaced = try_replica_pid(dir).is_some_and(|p| p != old_pid);
        if ls.len() == n && rw == n && replaced {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{what}: not healthy in 120 s: {ls:?}\n{}", up.log_text());
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The address the engine lists for the replica in `dir`: its unix socket beside the
/// directory, or (a path too long for one) the TCP port its process listens on.
fn address_of(run: &Path, dir: &Path) -> String {
    let ls = replicas(run);
    let unix = format!("unix:{}.sock", dir.display());
    if ls.iter().any(|r| r["address"] == unix.as_str()) {
        return unix;
    }
    let pid = replica_pid(dir);
    let ss = sh(&format!("ss -Htlnp | grep 'pid={pid},' || true"));
    ls.iter()
        .filter_map(|r| r["address"].as_str())
        .find(|a| ss.contains(a))
        .map(|s| s.to_string())
        .unwrap_or_else(|| panic!("address of {}: {ss} {ls:?}", dir.display()))
}

#[test]
fn up_rebuilds_failed_replicas_by_itself() {
    for t in ["fio", "nbdcopy", "pgrep", "ss"] {
        assert!(have(t), "{t} is not installed");
    }
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let data = t.path().join("data");
    let run = t.path().join("run");
    let sock = t.path().join("vol1.nbd");
    let (mut up, _) = spawn(
        &[
            "up", "vol1", "--size", "128M", "--replicas", "3", "--frontend", "none", "--nbd", &format!("unix:{}", sock.display()),
            "--data-dir", data.to_str().expect("utf8"), "--run-dir", run.to_str().expect("utf8"), "--stale-replica-timeout", "15s",
        ],
        &t.path().join("up.log"),
        "Ctrl-C",
    )
    .expect("up starts");
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let dir = |i: usize| data.join("vol1").join(format!("replica-{i}"));
    // fio writes 64 MiB at a bounded rate, then reads it all back and verifies.
    let load = || {
        let uri = uri.clone();
        std::thread::spawn(move || {
            fio(&format!(
                "--name=v --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=8 --size=64M --verify=crc32c \
                 --verify_fatal=1 --rate_iops=4000"
            ))
        })
    };

    // 1. kill -9 under writes.
    let a = load();
    std::thread::sleep(Duration::from_secs(1));
    let old1 = replica_pid(&dir(1));
    sh(&format!("kill -9 {old1}"));
    let took = wait_healthy(&run, 3, &dir(1), old1, &up, "after kill -9");
    eprintln!("[auto-rebuild] killed replica back to RW in {:.1} s", took.as_secs_f64());
    let (ok, errs, out) = a.join().expect("fio");
    assert!(ok && errs == 0, "fio verify across the kill: {out}");

    // 2. A hung replica: the engine drops it after its I/O timeout; up kills and restarts it.
    let b = load();
    std::thread::sleep(Duration::from_secs(1));
    let hung = replica_pid(&dir(2));
    sh(&format!("kill -STOP {hung}"));
    let took = wait_healthy(&run, 3, &dir(2), hung, &up, "after SIGSTOP");
    eprintln!("[auto-rebuild] hung replica replaced and RW in {:.1} s", took.as_secs_f64());
    assert!(!Path::new(&format!("/proc/{hung}")).exists() || sh(&format!("cat /proc/{hung}/stat")).contains(" Z "), "the hung process is gone");
    let (ok, errs, out) = b.join().expect("fio");
    assert!(ok && errs == 0, "fio verify across the hang: {out}");

    // 3. A replica whose directory is ruined cannot restart; once failed for longer than
    // staleReplicaTimeout (15 s here) its directory is deleted and it is built afresh.
    let old0 = replica_pid(&dir(0));
    std::fs::write(dir(0).join("volume.meta"), b"{ not json").expect("ruin volume.meta");
    sh(&format!("kill -9 {old0}"));
    let took = wait_healthy(&run, 3, &dir(0), old0, &up, "after a ruined directory");
    eprintln!("[auto-rebuild] ruined replica rebuilt from scratch after {:.1} s", took.as_secs_f64());
    assert!(took >= Duration::from_secs(14), "rebuilt before the stale timeout: {took:?}");
    assert!(up.log_text().contains("from scratch (stale)"), "{}", up.log_text());

    // 4. The operator removes a replica: it is stopped and stays out.
    let gone = address_of(&run, &dir(2));
    let pid2 = replica_pid(&dir(2));
    sh(&format!("LONGHORN_RUN_DIR='{}' '{}' replica rm {gone} -v vol1", run.display(), bin().display()));
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid2}/cmdline")).exists() && std::fs::read(format!("/proc/{pid2}/cmdline")).map(|c| !c.is_empty()).unwrap_or(false) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the removed replica's process was not stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    let ls = replicas(&run);
    assert_eq!(ls.len(), 2, "a removed replica is not brought back: {ls:?}");

    // Every replica left holds the volume's content.
    let now = t.path().join("now.raw");
    sh(&format!("nbdcopy '{uri}' '{}'", now.display()));
    assert!(up.term(), "up stops cleanly:\n{}", up.log_text());
    for l in up.log_text().lines().filter(|l| l.starts_with("longhorn up:")) {
        eprintln!("[auto-rebuild] {l}");
    }
    let want = std::fs::read(&now).expect("read");
    for i in [0, 1] {
        let got = read_layers(&head_chain(&dir(i)), 128 * MB);
        assert!(got == want, "replica-{i} differs from the volume");
    }
}
