//! The engine's control API: one request line from the socket, and each command's
//! arguments, parsed and checked as the engine does before it touches the volume.
//! Nothing that needs a live engine or the network runs (no replica address is
//! resolved, no backup target contacted).

use longhorn_engine::backup::store::Compression;
use longhorn_engine::backup::CreateRequest;
use longhorn_engine::control::{read_request, MAX_REQUEST_LEN};
use longhorn_engine::jobs::advance_clock;
use serde_json::Value;
use std::collections::HashMap;

pub fn control_request(data: &[u8]) {
    let req = match read_request(data) {
        Ok(Some(r)) => r,
        Ok(None) => {
            assert!(data.is_empty());
            return;
        }
        Err(_) => return,
    };
    let line_len = data.iter().position(|&b| b == b'\n').map_or(data.len(), |i| i + 1);
    assert!(line_len as u64 <= MAX_REQUEST_LEN);
    let cmd = req.get("cmd").and_then(|c| c.as_str()).expect("a request has a cmd string");
    match cmd {
        "job-add" => crate::jobs::accepted_jobs(req.get("jobs").unwrap_or(&Value::Null)),
        "job-clock" => {
            if let Some(secs) = req.get("advance").and_then(|n| n.as_i64()) {
                let now = crate::jobs::now();
                if let Ok(t) = advance_clock(now, secs) {
                    assert_eq!((t - now).num_seconds(), secs);
                }
            }
        }
        "snapshot-create" => {
            if let Some(l) = req.get("labels").filter(|l| !l.is_null()) {
                let _ = serde_json::from_value::<HashMap<String, String>>(l.clone());
            }
            if let Some(n) = req.get("name").and_then(|n| n.as_str()) {
                if longhorn_replica::snapshot::check_name(n).is_ok() {
                    assert!(!n.contains('/') && !n.starts_with('.') && n.len() <= 200);
                }
            }
        }
        "backup-create" => {
            let Ok(r) = serde_json::from_value::<CreateRequest>(req.clone()) else { return };
            let _ = Compression::parse(r.compression.as_deref().unwrap_or("lz4"));
            crate::urls::open_target(&r.target, &r.env);
        }
        _ => {}
    }
}
