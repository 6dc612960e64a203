//! `GET /metrics`: Prometheus text format (version 0.0.4) with Longhorn's metric
//! names, from the supervisor's last samples (no engine is asked at scrape time).

use crate::mgr::{robustness, volume_state, Shared};
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::IntoResponse;
use std::fmt::Write;

const STATES: [&str; 7] = ["creating", "attached", "detached", "attaching", "detaching", "deleting", "error"];
const ROBUSTNESS: [&str; 4] = ["unknown", "healthy", "degraded", "faulted"];
const MODES: [&str; 3] = ["RW", "WO", "ERR"];

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} gauge");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        let _ = writeln!(self.0, "{name}{{{}}} {v}", l.join(","));
    }
}

pub fn render(m: &Shared) -> String {
    let g = m.lock();
    let mut o = Out(String::new());
    type Getter = fn(&crate::mgr::Entry, &crate::mgr::Rates) -> f64;
    let per_volume: [(&str, &str, Getter); 8] = [
        ("longhorn_volume_capacity_bytes", "Configured size of this volume in bytes", |e, _| e.st.size as f64),
        ("longhorn_volume_actual_size_bytes", "Bytes the volume's snapshots and head use on one replica", |e, _| {
            e.sample.as_ref().and_then(|s| s.snapshots.as_array()).map(|a| a.iter().map(|x| x["size"].as_u64().unwrap_or(0)).sum::<u64>()).unwrap_or(0) as f64
        }),
        ("longhorn_volume_read_throughput", "Read throughput of this volume (bytes/s)", |_, r| r.read_bps),
        ("longhorn_volume_write_throughput", "Write throughput of this volume (bytes/s)", |_, r| r.write_bps),
        ("longhorn_volume_read_iops", "Read IOPS of this volume", |_, r| r.read_iops),
        ("longhorn_volume_write_iops", "Write IOPS of this volume", |_, r| r.write_iops),
        ("longhorn_volume_read_latency", "Mean read latency of this volume over the last interval (ns)", |_, r| r.read_latency_ns),
        ("longhorn_volume_write_latency", "Mean write latency of this volume over the last interval (ns)", |_, r| r.write_latency_ns),
    ];
    for (name, help, f) in per_volume {
        o.head(name, help);
        for e in g.values() {
            o.line(name, &[("volume", &e.st.name)], f(e, &e.rates));
        }
    }
    o.head("longhorn_volume_state", "State of this volume (one-hot)");
    for e in g.values() {
        let cur = volume_state(e);
        for s in STATES {
            o.line("longhorn_volume_state", &[("volume", &e.st.name), ("state", s)], (s == cur) as u8 as f64);
        }
    }
    o.head("longhorn_volume_robustness", "Robustness of this volume (one-hot)");
    for e in g.values() {
        let cur = if volume_state(e) == "attached" { robustness(e) } else { "unknown" };
        for s in ROBUSTNESS {
            o.line("longhorn_volume_robustness", &[("volume", &e.st.name), ("state", s)], (s == cur) as u8 as f64);
        }
    }
    let reps: Vec<(String, Vec<serde_json::Value>)> =
        g.values().filter(|e| e.sample.is_some()).map(|e| (e.st.name.clone(), crate::view::replicas(m, e))).collect();
    o.head("longhorn_engine_replica_mode", "Mode of each replica of the engine (one-hot over RW, WO, ERR)");
    for (v, rs) in &reps {
        for r in rs {
            let rn = r["name"].as_str().unwrap_or("");
            for md in MODES {
                o.line("longhorn_engine_replica_mode", &[("volume", v), ("replica", rn), ("mode", md)], (r["mode"] == md) as u8 as f64);
            }
        }
    }
    o.head("longhorn_engine_rebuild_progress", "Rebuild progress of each replica in percent (100 when RW)");
    for (v, rs) in &reps {
        for r in rs {
            let p = r["rebuildProgress"].as_f64().unwrap_or(if r["mode"] == "RW" { 100.0 } else { 0.0 });
            o.line("longhorn_engine_rebuild_progress", &[("volume", v), ("replica", r["name"].as_str().unwrap_or(""))], p);
        }
    }
    o.head("longhorn_backup_state", "State of each backup this manager's engines took (0 new, 1 pending, 2 in progress, 3 completed, 4 error, 5 unknown)");
    for e in g.values() {
        let Some(s) = &e.sample else { continue };
        for b in s.backups.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            let n = match b["state"].as_str() {
                Some("in-progress") => 2.0,
                Some("complete") => 3.0,
                Some("error") => 4.0,
                _ => 5.0,
            };
            o.line("longhorn_backup_state", &[("volume", &e.st.name), ("backup", b["backup"].as_str().unwrap_or(""))], n);
        }
    }
    o.head("longhorn_snapshot_actual_size_bytes", "Bytes each snapshot uses on one replica");
    for e in g.values() {
        let Some(s) = &e.sample else { continue };
        // Snapshots only: the head is the volume's live layer, not a snapshot (its
        // bytes count in longhorn_volume_actual_size_bytes).
        for sn in s.snapshots.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            let n = sn["name"].as_str().unwrap_or("");
            if n == "volume-head" {
                continue;
            }
            o.line("longhorn_snapshot_actual_size_bytes", &[("volume", &e.st.name), ("snapshot", n)], sn["size"].as_f64().unwrap_or(0.0));
        }
    }
    o.0
}

pub async fn metrics(State(m): State<Shared>, _req: Request) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], render(&m))
}
