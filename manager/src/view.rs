//! The API's resources as JSON (Longhorn's field names), built from a volume's state
//! and its engine's last sample. Every resource carries `links.self` and the `actions`
//! that may be done to it now.

use crate::mgr::{robustness, volume_state, Entry, Mgr};
use serde_json::{json, Map, Value};
use std::path::Path;

pub fn volume_url(base: &str, name: &str) -> String {
    format!("{base}/v1/volumes/{name}")
}

fn actions(base_url: &str, names: &[&str]) -> Value {
    let mut m = Map::new();
    for a in names {
        m.insert(a.to_string(), json!(format!("{base_url}?action={a}")));
    }
    Value::Object(m)
}

/// Which address is which replica directory: each replica logs `replica serving ...
/// addr=ADDR` when it starts (`longhorn up` picks its port), so the last such line of
/// `DATA_DIR/VOL/logs/replica-N.log` names replica-N's current address.
fn replica_dirs(data_dir: &Path, vol: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let logs = data_dir.join(vol).join("logs");
    for i in 0..n.max(1).min(64) {
        let log = logs.join(format!("replica-{i}.log"));
        if let Some(a) = last_serving_addr(&log) {
            out.push((a, format!("replica-{i}")));
        }
    }
    out
}

/// The address in the last "replica serving ... addr=" line of a replica's log. Logs
/// only grow (and run long under RUST_LOG=debug) and this is asked under the volumes'
/// lock several times a second, so each log is read once: later calls read only what
/// was appended since.
fn last_serving_addr(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    static SEEN: std::sync::Mutex<Option<std::collections::HashMap<std::path::PathBuf, (u64, u64, Option<String>)>>> = std::sync::Mutex::new(None);
    let mut g = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = g.get_or_insert_with(Default::default);
    let Ok(mut f) = std::fs::File::open(log) else {
        seen.remove(log);
        return None;
    };
    let (len, ino) = f.metadata().map(|m| (m.len(), std::os::unix::fs::MetadataExt::ino(&m))).unwrap_or((0, 0));
    let (seen_ino, mut from, mut addr) = seen.get(log).cloned().unwrap_or((ino, 0, None));
    if len < from || seen_ino != ino {
        // Truncated, or another file (the volume deleted and made again): from the start.
        (from, addr) = (0, None);
    }
    // A first look at a huge log reads its last 8 MiB.
    from = from.max(len.saturating_sub(8 << 20));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_ok() && f.take(len - from).read_to_end(&mut buf).is_ok() {
        // Up to the last whole line; a line being written is read next time.
        let whole = buf.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..whole]);
        if let Some(a) = text
            .lines()
            .rev()
            .find(|l| l.contains("replica serving"))
            .map(strip_ansi)
            .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")).map(|a| a.trim_matches('"').to_string()))
        {
            addr = Some(a);
        }
        from += whole as u64;
    }
    seen.insert(log.to_path_buf(), (ino, from, addr.clone()));
    addr
}

/// A log line without its terminal colour codes (ESC [ ... m).
fn strip_ansi(l: &str) -> String {
    let mut out = String::with_capacity(l.len());
    let mut it = l.chars();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn replicas(m: &Mgr, e: &Entry) -> Vec<Value> {
    let name = &e.st.name;
    let vol_dir = m.cfg.data_dir.join(name);
    let remote = |k: usize, addr: &str| format!("{name}-r-remote-{k}-{}", addr.replace([':', '.', '[', ']'], "-"));
    let Some(s) = &e.sample else {
        // Detached: the directories that exist, and the replicas other hosts keep.
        let mut out: Vec<Value> = (0..e.st.local_replicas())
            .map(|i| {
                let dir = vol_dir.join(format!("replica-{i}"));
                json!({"name": format!("{name}-r-{i}"), "address": "", "mode": "", "running": false,
                       "dataPath": dir.display().to_string(), "rebuildProgress": null, "failedAt": ""})
            })
            .collect();
        for (k, a) in e.st.remote_replicas.iter().enumerate() {
            out.push(json!({"name": remote(k, a), "address": a, "mode": "", "running": false,
                            "dataPath": "", "rebuildProgress": null, "failedAt": ""}));
        }
        return out;
    };
    let dirs = replica_dirs(&m.cfg.data_dir, name, e.st.number_of_replicas + 4);
    let mut out = Vec::new();
    for (i, r) in s.replicas.as_array().map(|a| a.as_slice()).unwrap_or(&[]).iter().enumerate() {
        let addr = r["address"].as_str().unwrap_or("");
        let dir = dirs.iter().find(|(a, _)| a == addr).map(|(_, d)| d.clone()).unwrap_or_else(|| format!("replica-{i}"));
        let idx = dir.strip_prefix("replica-").unwrap_or("0");
        // Another host keeps it: no directory here.
        let (rname, data_path) = match e.st.remote_replicas.iter().position(|a| a == addr) {
            Some(k) => (remote(k, addr), String::new()),
            None => (format!("{name}-r-{idx}"), vol_dir.join(&dir).display().to_string()),
        };
        let p = &r["progress"];
        let progress = if p.is_object() && p["active"] == true {
            let total = p["bytes_total"].as_u64().unwrap_or(0);
            let done = p["bytes_done"].as_u64().unwrap_or(0);
            json!(if total == 0 { 0 } else { (done * 100 / total).min(100) })
        } else {
            Value::Null
        };
        out.push(json!({
            "name": rname, "address": addr, "mode": r["mode"], "running": r["mode"] != "ERR",
            "dataPath": data_path, "rebuildProgress": progress,
            "failedAt": if r["mode"] == "ERR" { r["error"].as_str().unwrap_or("").to_string() } else { String::new() },
            "revision": r["revision"],
        }));
    }
    out
}

pub fn snapshots(e: &Entry, base: &str) -> Vec<Value> {
    let Some(s) = &e.sample else { return Vec::new() };
    snapshot_list(&s.snapshots, &volume_url(base, &e.st.name))
}

/// The engine's snapshot list in Longhorn's shape, ending with `volume-head`.
pub fn snapshot_list(raw: &Value, vol_url: &str) -> Vec<Value> {
    let list = raw.as_array().map(|a| a.as_slice()).unwrap_or(&[]);
    let mut out = Vec::new();
    let mut head_parent = String::new();
    let mut head = None;
    for s in list {
        let name = s["name"].as_str().unwrap_or("").to_string();
        // The engine lists the head itself (as its last entry); it is no snapshot and
        // takes no snapshot actions.
        if name == "volume-head" {
            head = Some(json!({
                "type": "snapshot", "id": name, "name": name, "parent": s["parent"].as_str().unwrap_or(""), "children": [],
                "created": s["created"].as_str().unwrap_or(""), "size": s["size"].as_u64().unwrap_or(0).to_string(),
                "usercreated": false, "removed": false, "labels": {},
                "links": {"self": format!("{vol_url}?action=snapshotList")}, "actions": {},
            }));
            continue;
        }
        let children: Vec<Value> = s["children"].as_array().cloned().unwrap_or_default();
        if children.iter().any(|c| c == "volume-head") || (s["in_chain"] == true && children.is_empty()) {
            head_parent = name.clone();
        }
        out.push(json!({
            "type": "snapshot", "id": name, "name": name, "parent": s["parent"].as_str().unwrap_or(""),
            "children": children, "created": s["created"].as_str().unwrap_or(""),
            "size": s["size"].as_u64().unwrap_or(0).to_string(), "usercreated": s["user_created"] == true,
            "removed": s["removed"] == true, "labels": s["labels"].as_object().cloned().unwrap_or_default(),
            "links": {"self": format!("{vol_url}?action=snapshotGet&name={name}")},
            "actions": {
                "snapshotRevert": format!("{vol_url}?action=snapshotRevert"),
                "snapshotDelete": format!("{vol_url}?action=snapshotDelete"),
                "snapshotBackup": format!("{vol_url}?action=snapshotBackup"),
            },
        }));
    }
    // The head last, whatever order the engine listed it in (after a revert it is
    // not), so the chain is drawn ending in it.
    if let Some(h) = head {
        out.push(h);
        return out;
    }
    out.push(json!({
        "type": "snapshot", "id": "volume-head", "name": "volume-head", "parent": head_parent, "children": [],
        "created": "", "size": "0", "usercreated": false, "removed": false, "labels": {},
        "links": {"self": format!("{vol_url}?action=snapshotList")}, "actions": {},
    }));
    out
}

fn backup_status(e: &Entry) -> Vec<Value> {
    let Some(s) = &e.sample else { return Vec::new() };
    s.backups
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(|b| {
            let total = b["blocks_total"].as_u64().unwrap_or(0);
            let done = b["blocks_done"].as_u64().unwrap_or(0);
            let state = match b["state"].as_str() {
                Some("complete") => "Completed",
                Some("in-progress") => "InProgress",
                Some("error") => "Error",
                _ => "Unknown",
            };
            let progress = if state == "Completed" { 100 } else if total == 0 { 0 } else { (done * 100 / total).min(100) };
            json!({"id": b["backup"], "snapshot": b["snapshot"], "progress": progress, "state": state,
                   "error": b["error"], "url": b["url"], "finishedAt": b["finished_at"].as_str().unwrap_or("")})
        })
        .collect()
}

pub fn volume(m: &Mgr, e: &Entry, base: &str) -> Value {
    let st = &e.st;
    let url = volume_url(base, &st.name);
    let state = volume_state(e);
    let reps = replicas(m, e);
    let rebuild: Vec<Value> = reps
        .iter()
        .filter(|r| !r["rebuildProgress"].is_null())
        .map(|r| json!({"replica": r["name"], "progress": r["rebuildProgress"], "state": "in_progress"}))
        .collect();
    let backups = backup_status(e);
    let (endpoint, actual) = match &e.sample {
        Some(s) => {
            let ep = s.info["endpoint"].as_str().unwrap_or("");
            let kind = s.info["frontend"].as_str().unwrap_or("");
            let actual: u64 = s.snapshots.as_array().map(|a| a.iter().map(|x| x["size"].as_u64().unwrap_or(0)).sum()).unwrap_or(0);
            (if kind == "nbd-export" || kind.is_empty() { String::new() } else { ep.to_string() }, actual)
        }
        None => (String::new(), 0),
    };
    let last_backup = backups.iter().rev().find(|b| b["state"] == "Completed");
    let acts: Vec<&str> = match state {
        "attached" => vec![
            "detach", "snapshotCreate", "snapshotList", "snapshotDelete", "snapshotRevert", "snapshotPurge", "snapshotBackup",
            "updateReplicaCount", "replicaRemove", "recurringJobAdd", "recurringJobDelete", "recurringJobList",
        ],
        "detached" => vec!["attach", "expand", "updateReplicaCount", "recurringJobAdd", "recurringJobDelete", "recurringJobList"],
        "error" => vec!["detach", "recurringJobList"],
        _ => vec![],
    };
    let restore = e.restore.map(|(done, total)| {
        json!([{"progress": if total == 0 { 0 } else { done * 100 / total }, "state": "in_progress", "fromBackup": st.from_backup}])
    });
    json!({
        "type": "volume", "id": st.name, "name": st.name,
        "size": st.size.to_string(), "actualSize": actual,
        "numberOfReplicas": st.number_of_replicas, "staleReplicaTimeout": st.stale_replica_timeout,
        "replicaAddresses": st.remote_replicas, "healthyReplicas": st.healthy_replicas,
        "accessMode": st.access_mode, "fromBackup": st.from_backup, "dataLocality": st.locality(), "generation": st.generation,
        "frontend": st.frontend, "disableFrontend": st.disable_frontend,
        "state": state, "robustness": if st.attached && state == "attached" { robustness(e) } else { "unknown" },
        "created": st.created,
        "endpoint": endpoint,
        "nbdEndpoint": if e.sample.is_some() { m.nbd_uri(&st.name) } else { String::new() },
        "shareEndpoint": if st.access_mode == "rwx" && state == "attached" && st.share_port != 0 {
            format!("nfs://{}/{}", std::net::SocketAddr::from((m.cfg.replica_ip, st.share_port)), st.name)
        } else {
            String::new()
        },
        "attachedBy": st.attached_by,
        "shareClients": if st.access_mode == "rwx" { m.share_clients(st) } else { Vec::new() },
        "currentImage": "longhorn-rs",
        "lastBackup": last_backup.map(|b| b["id"].clone()).unwrap_or(json!("")),
        "lastBackupAt": last_backup.map(|b| b["finishedAt"].clone()).unwrap_or(json!("")),
        "message": if !st.message.is_empty() { st.message.clone() } else { e.sample_error.clone() },
        "replicas": reps,
        "rebuildStatus": rebuild,
        "backupStatus": backups,
        "restoreStatus": restore.unwrap_or(json!([])),
        "recurringJobs": st.recurring_jobs,
        "links": {"self": url},
        "actions": actions(&url, &acts),
    })
}
