//! `longhorn snapshot ...`: the CLI side and the engine's control handlers.

use crate::{print_json, table, VolumeRef};
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use longhorn_engine::{control, Volume};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of the live volume (a UUID name when none is given).
    Create(CreateArgs),
    /// The snapshots: name, parent, children, created, size, user-created, removed, labels.
    Ls(VolumeRef),
    /// Remove a snapshot; its data is merged into its child so the volume reads the same.
    Rm(NameArgs),
    /// Make the volume read as it did at a snapshot (no client may be connected).
    Revert(NameArgs),
    /// Remove system snapshots that are no longer needed.
    Purge(VolumeRef),
}

#[derive(Args)]
pub struct CreateArgs {
    pub name: Option<String>,
    /// A label `key=value`; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[command(flatten)]
    pub vol: VolumeRef,
}

#[derive(Args)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub vol: VolumeRef,
}

pub fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else { bail!("label {l:?} is not key=value") };
        if k.is_empty() {
            bail!("label {l:?} has an empty key");
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

fn call(v: &VolumeRef, req: Value) -> Result<Value> {
    control::call(&v.common.run_dir, &v.volume, &req).map_err(|e| anyhow!(e))
}

pub fn run(c: SnapshotCmd) -> Result<()> {
    match c {
        SnapshotCmd::Create(a) => {
            let labels = parse_labels(&a.labels)?;
            let r = call(&a.vol, json!({"cmd": "snapshot-create", "name": a.name, "labels": labels}))?;
            if a.vol.common.json {
                print_json(&r);
            } else {
                println!(
                    "{} (I/O paused {} us)",
                    r["name"].as_str().unwrap_or(""),
                    r["pause_us"].as_u64().unwrap_or(0)
                );
            }
        }
        SnapshotCmd::Ls(v) => {
            let r = call(&v, json!({"cmd": "snapshot-ls"}))?;
            if v.common.json {
                print_json(&r);
            } else {
                let rows = table::rows(&r, |s| {
                        let labels = s["labels"]
                            .as_object()
                            .map(|o| {
                                let mut v: Vec<String> =
                                    o.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect();
                                v.sort();
                                v.join(",")
                            })
                            .unwrap_or_default();
                        let children: Vec<&str> = s["children"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
                            .unwrap_or_default();
                        vec![
                            s["name"].as_str().unwrap_or("").to_string(),
                            s["parent"].as_str().unwrap_or("").to_string(),
                            children.join(","),
                            s["created"].as_str().unwrap_or("").to_string(),
                            table::human_size(s["size"].as_u64().unwrap_or(0)),
                            s["user_created"].as_bool().unwrap_or(false).to_string(),
                            s["removed"].as_bool().unwrap_or(false).to_string(),
                            labels,
                        ]
                });
                table::print(&["NAME", "PARENT", "CHILDREN", "CREATED", "SIZE", "USER-CREATED", "REMOVED", "LABELS"], &rows);
            }
        }
        SnapshotCmd::Rm(a) => {
            let r = call(&a.vol, json!({"cmd": "snapshot-rm", "name": a.name}))?;
            println!("{}", r.as_str().unwrap_or(""));
        }
        SnapshotCmd::Revert(a) => {
            call(&a.vol, json!({"cmd": "snapshot-revert", "name": a.name}))?;
            println!("volume {} reverted to {}", a.vol.volume, a.name);
        }
        SnapshotCmd::Purge(v) => {
            let r = call(&v, json!({"cmd": "snapshot-purge"}))?;
            for l in r.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
                println!("{}", l.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

/// The engine side of `snapshot-*` control requests.
pub fn control(v: &Arc<Volume>, cmd: &str, req: &Value) -> std::result::Result<Value, String> {
    let name = || req.get("name").and_then(|n| n.as_str()).ok_or_else(|| "request has no \"name\"".to_string());
    match cmd {
        "snapshot-create" => {
            let labels: Option<HashMap<String, String>> = match req.get("labels") {
                None | Some(Value::Null) => None,
                Some(l) => Some(serde_json::from_value(l.clone()).map_err(|e| format!("labels: {e}"))?),
            };
            let labels = labels.filter(|l| !l.is_empty());
            let r = v.snapshot(req.get("name").and_then(|n| n.as_str()), labels, true)?;
            serde_json::to_value(r).map_err(|e| e.to_string())
        }
        "snapshot-ls" => serde_json::to_value(v.snapshot_list()?).map_err(|e| e.to_string()),
        "snapshot-rm" => v.snapshot_remove(name()?).map(Value::String),
        "snapshot-revert" => v.snapshot_revert(name()?).map(|_| Value::Null),
        "snapshot-purge" => v.snapshot_purge().map(|l| json!(l)),
        other => Err(format!("unknown command {other:?}")),
    }
}
