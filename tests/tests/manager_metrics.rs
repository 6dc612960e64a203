//! `GET /metrics` of a real manager, read by Prometheus's own text parser
//! (`prometheus_client.parser`, from PyPI via tests/run): Longhorn's metric names
//! (manager/API.md, Metrics), the one-hot state and robustness gauges, capacity, and
//! the I/O rates the manager derives from its engine's `volume-stats` counters while a
//! real NBD client (libnbd's nbdsh) writes and reads the volume's export.

use longhorn_tests::manager::Manager;
use longhorn_tests::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VOLUME: &str = "metrics";
const SIZE: u64 = 32 << 20;

/// stdin: a scrape; stdout: JSON `[[name, {labels}, value], ...]` of every sample, as
/// the Prometheus client library parses it (it raises on malformed text).
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    out.append([fam.name, {"__family__": "1", "__type__": fam.type}, 0.0])
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;

struct Scrape(Vec<(String, serde_json::Map<String, Value>, f64)>);

impl Scrape {
    fn take(m: &Manager) -> Scrape {
        let (st, text) = m.call_raw("GET", "/metrics", None, &[]);
        assert_eq!(st, 200, "GET /metrics: {text}");
        let mut child = Command::new("python3")
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feeding the parser");
        let o = child.wait_with_output().expect("parser");
        assert!(o.status.success(), "the Prometheus parser refuses the scrape: {}\n{text}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).expect("parser output");
        let rows = v
            .as_array()
            .expect("list")
            .iter()
            .map(|r| (r[0].as_str().unwrap_or("").to_string(), r[1].as_object().cloned().unwrap_or_default(), r[2].as_f64().unwrap_or(f64::NAN)))
            .collect();
        Scrape(rows)
    }

    fn has_family(&self, name: &str) -> bool {
        self.0.iter().any(|(n, l, _)| n == name && l.contains_key("__family__"))
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    fn values(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && !l.contains_key("__family__") && labels.iter().all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(*v)))
            .map(|(_, _, v)| *v)
            .collect()
    }

    /// The one sample of `name` with those labels.
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let v = self.values(name, labels);
        assert_eq!(v.len(), 1, "{name}{labels:?}: {} samples, want 1", v.len());
        v[0]
    }

    /// `{state=...}` -> value of a one-hot gauge of the volume.
    fn one_hot(&self, name: &str) -> Vec<(String, f64)> {
        self.0
            .iter()
            .filter(|(n, l, _)| n == name && l.get("volume").and_then(|x| x.as_str()) == Some(VOLUME))
            .map(|(_, l, v)| (l.get("state").and_then(|x| x.as_str()).unwrap_or("").to_string(), *v))
            .collect()
    }
}

fn assert_one_hot(s: &Scrape, name: &str, want: &str) {
    let states = s.one_hot(name);
    assert!(states.len() >= 2, "{name}: {states:?}");
    for (st, v) in &states {
        assert_eq!(*v, if st == want { 1.0 } else { 0.0 }, "{name}{{state={st:?}}}: want one-hot on {want:?}: {states:?}");
    }
    assert!(states.iter().any(|(st, _)| st == want), "{name} has no state {want:?}: {states:?}");
}

#[test]
fn metrics_parse_as_prometheus_and_follow_the_volume() {
    let parser = Command::new("python3").args(["-c", "import prometheus_client.parser"]).output().expect("python3");
    assert!(parser.status.success(), "prometheus_client is not installed (tests/run installs it from PyPI)");
    assert!(have("nbdsh"), "nbdsh (libnbd-bin, python3-libnbd) is needed");
    let tmp = tempfile::Builder::new().prefix("lh-metrics-").tempdir_in(test_root()).expect("tempdir");
    let m = Manager::start(tmp.path());
    let backups = tmp.path().join("backups");
    std::fs::create_dir_all(&backups).expect("backups dir");
    let (st, v) = m.call("PUT", "/v1/settings/backup-target", Some(&json!({"value": format!("file://{}", backups.display())})));
    assert_eq!(st, 200, "{v}");
    m.post("/v1/volumes", &json!({"name": VOLUME, "size": SIZE, "numberOfReplicas": 2, "disableFrontend": true}));
    let v = m.post(&format!("/v1/volumes/{VOLUME}?action=attach"), &json!({}));
    assert_eq!(v["state"], "attached", "{v}");
    let uri = m.nbd(VOLUME);

    // A write and read load for 8 s in the background; scrapes while it runs.
    let load = format!(
        "import time\nbuf = bytes(range(256)) * 256\nt = time.time()\nn = 0\n\
         while time.time() - t < 8:\n    h.pwrite(buf, (n % 256) * 65536)\n    h.pread(65536, (n % 256) * 65536)\n    n += 1\n\
         h.flush()\nprint(n)\n"
    );
    let writer = Command::new("timeout")
        .args(["30", "/usr/bin/python3", "-m", "nbd", "-u", &uri, "-c", &load])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let t = Instant::now();
    let (mut w_iops, mut w_bps, mut r_iops, mut r_bps, mut w_lat) = (0f64, 0f64, 0f64, 0f64, 0f64);
    std::thread::sleep(Duration::from_millis(2500));
    while t.elapsed() < Duration::from_secs(7) {
        let s = Scrape::take(&m);
        let l = [("volume", VOLUME)];
        w_iops = w_iops.max(s.one("longhorn_volume_write_iops", &l));
        w_bps = w_bps.max(s.one("longhorn_volume_write_throughput", &l));
        r_iops = r_iops.max(s.one("longhorn_volume_read_iops", &l));
        r_bps = r_bps.max(s.one("longhorn_volume_read_throughput", &l));
        w_lat = w_lat.max(s.one("longhorn_volume_write_latency", &l));
        eprintln!("under load: write {w_iops:.0} IOPS {w_bps:.0} B/s (mean latency {w_lat:.0} ns), read {r_iops:.0} IOPS {r_bps:.0} B/s");
        std::thread::sleep(Duration::from_millis(1000));
    }
    let out = writer.wait_with_output().expect("nbdsh");
    assert!(out.status.success(), "the NBD load failed: {}", String::from_utf8_lossy(&out.stderr));
    let writes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("the load prints its count");
    eprintln!("the load made {writes} writes and reads of 64 KiB");
    assert!(writes > 10, "the load did too little: {writes}");
    assert!(w_iops > 0.0 && w_bps > 0.0, "no write rate while writing: {w_iops} IOPS, {w_bps} B/s");
    assert!(r_iops > 0.0 && r_bps > 0.0, "no read rate while reading: {r_iops} IOPS, {r_bps} B/s");
    assert!(w_lat > 0.0, "no write latency while writing");
    // 64 KiB per request: bytes/s over IOPS is the request size, give or take the
    // interval edges.
    assert!(w_bps / w_iops > 16384.0 && w_bps / w_iops < 262144.0, "throughput {w_bps} vs IOPS {w_iops}");
    // What was written is there.
    let back = sh(&format!("{NBDSH} -u '{uri}' -c 'print(h.pread(65536, 65536 * 7) == bytes(range(256)) * 256)'"));
    assert_eq!(back.trim(), "True", "data read back over NBD differs");

    // A snapshot and a backup, for their gauges.
    m.post(&format!("/v1/volumes/{VOLUME}?action=snapshotCreate"), &json!({"name": "m1"}));
    let b = m.post(&format!("/v1/volumes/{VOLUME}?action=snapshotBackup"), &json!({"name": "m1"}));
    let backup = b["backup"].as_str().unwrap_or_default().to_string();
    m.wait_volume(VOLUME, 60, "backed up", |v| v["backupStatus"].as_array().is_some_and(|a| a.iter().any(|s| s["state"] == "Completed")));
    // Idle, past two sampling intervals of the 1 s sampler.
    std::thread::sleep(Duration::from_millis(2500));
    let s = Scrape::take(&m);
    for name in [
        "longhorn_volume_capacity_bytes", "longhorn_volume_actual_size_bytes", "longhorn_volume_state", "longhorn_volume_robustness",
        "longhorn_volume_read_throughput", "longhorn_volume_write_throughput", "longhorn_volume_read_iops", "longhorn_volume_write_iops",
        "longhorn_volume_read_latency", "longhorn_volume_write_latency", "longhorn_engine_replica_mode", "longhorn_engine_rebuild_progress",
        "longhorn_backup_state", "longhorn_snapshot_actual_size_bytes",
    ] {
        assert!(s.has_family(name), "no metric family {name}");
        assert!(!s.values(name, &[("volume", VOLUME)]).is_empty(), "{name} has no sample for volume {VOLUME}");
    }
    let l = [("volume", VOLUME)];
    assert_eq!(s.one("longhorn_volume_capacity_bytes", &l), SIZE as f64);
    let actual = s.one("longhorn_volume_actual_size_bytes", &l);
    assert!(actual >= (256 * 65536) as f64 && actual <= SIZE as f64 * 1.01, "actual size {actual} after writing 16 MiB");
    assert_one_hot(&s, "longhorn_volume_state", "attached");
    assert_one_hot(&s, "longhorn_volume_robustness", "healthy");
    for st in ["creating", "attached", "detached", "attaching", "detaching", "error"] {
        assert_eq!(s.values("longhorn_volume_state", &[("volume", VOLUME), ("state", st)]).len(), 1, "state {st}");
    }
    for st in ["unknown", "healthy", "degraded", "faulted"] {
        assert_eq!(s.values("longhorn_volume_robustness", &[("volume", VOLUME), ("state", st)]).len(), 1, "robustness {st}");
    }
    let rep = format!("{VOLUME}-r-0");
    assert_eq!(s.one("longhorn_engine_replica_mode", &[("volume", VOLUME), ("replica", &rep), ("mode", "RW")]), 1.0);
    assert_eq!(s.one("longhorn_engine_replica_mode", &[("volume", VOLUME), ("replica", &rep), ("mode", "ERR")]), 0.0);
    assert_eq!(s.one("longhorn_engine_rebuild_progress", &[("volume", VOLUME), ("replica", &rep)]), 100.0);
    assert_eq!(s.one("longhorn_backup_state", &[("volume", VOLUME), ("backup", &backup)]), 3.0, "a completed backup is 3");
    let snap = s.one("longhorn_snapshot_actual_size_bytes", &[("volume", VOLUME), ("snapshot", "m1")]);
    assert!(snap >= (256 * 65536) as f64, "snapshot m1 holds the 16 MiB written before it: {snap}");
    assert!(
        s.values("longhorn_snapshot_actual_size_bytes", &[("volume", VOLUME), ("snapshot", "volume-head")]).is_empty(),
        "the volume head is not a snapshot"
    );
    // No load: the rates of the last interval are zero again.
    for name in ["longhorn_volume_write_iops", "longhorn_volume_write_throughput", "longhorn_volume_read_iops", "longhorn_volume_read_throughput"] {
        assert_eq!(s.one(name, &l), 0.0, "{name} while idle");
    }

    // A replica killed: robustness turns degraded, then healthy after the rebuild.
    // `longhorn up` would rebuild it within a second, between two samples, so it is
    // held (SIGSTOP) until the scrape has seen the change.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(m.data.join("manager").join("volumes").join(format!("{VOLUME}.json"))).expect("state file"),
    )
    .expect("state JSON");
    let up = state["pid"].as_i64().expect("the up pid");
    let _held = Held(up);
    sh(&format!("kill -STOP {up}"));
    let dir = m.data.join(VOLUME).join("replica-1");
    let pid = sh(&format!("pgrep -f -- 'replica serve .*--dir {}( |$)' || true", dir.display()));
    let pid = pid.lines().next().map(str::trim).filter(|p| !p.is_empty()).expect("the replica-1 process");
    sh(&format!("kill -9 {pid}"));
    let until = |want: &str, secs: u64| {
        let t = Instant::now();
        loop {
            let s = Scrape::take(&m);
            if s.one("longhorn_volume_robustness", &[("volume", VOLUME), ("state", want)]) == 1.0 {
                assert_one_hot(&s, "longhorn_volume_robustness", want);
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(secs), "robustness not {want} within {secs} s: {:?}", s.one_hot("longhorn_volume_robustness"));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("degraded", 30);
    sh(&format!("kill -CONT {up}"));
    until("healthy", 90);
}

/// Sends SIGCONT to a process the test stopped, whatever the test's outcome.
struct Held(i64);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = sh_try(&format!("kill -CONT {}", self.0));
    }
}
