//! `longhorn manager volume|snapshot|backup|job|setting ...`: the operator CLI over the
//! manager's REST API (manager/API.md), so a script does what the web UI does. It only
//! speaks HTTP to the manager; the manager does the work.

use crate::snapshot::parse_labels;
use crate::{print_json, table};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct Conn {
    /// The manager's address.
    #[arg(long, default_value = "http://127.0.0.1:9500", env = "LONGHORN_MANAGER_URL", global = true)]
    pub url: String,
    /// A file holding the bearer token (a manager bound beyond loopback asks for one).
    #[arg(long, env = "LONGHORN_MANAGER_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the manager's HTTPS certificate; needed for
    /// an https:// --url.
    #[arg(long, env = "LONGHORN_MANAGER_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum ApiCmd {
    /// Volumes: ls, get, create, attach, detach, delete, replicas, expand.
    #[command(subcommand)]
    Volume(VolumeSub),
    /// Snapshots of a volume: ls, create, rm, revert, purge, backup.
    #[command(subcommand)]
    Snapshot(SnapshotSub),
    /// The backup target's volumes and backups: volumes, ls, rm, restore.
    #[command(subcommand)]
    Backup(BackupSub),
    /// Recurring jobs of a volume: ls, add, rm.
    #[command(subcommand)]
    Job(JobSub),
    /// Settings (backup-target, backup-target-credential-secret): get, set.
    #[command(subcommand)]
    Setting(SettingSub),
}

#[derive(Subcommand)]
pub enum VolumeSub {
    Ls,
    Get {
        name: String,
    },
    Create {
        name: String,
        #[arg(long)]
        size: String,
        #[arg(long)]
        replicas: Option<u64>,
        /// Minutes a failed replica may be away before it is replaced.
        #[arg(long)]
        stale_replica_timeout: Option<u64>,
        /// A backup URL to restore the new volume from.
        #[arg(long)]
        from_backup: Option<String>,
        /// rwo or rwx.
        #[arg(long)]
        access_mode: Option<String>,
        /// A JSON list of recurring jobs, as in a StorageClass.
        #[arg(long)]
        recurring_jobs: Option<String>,
    },
    Attach {
        name: String,
        /// blockdev (ublk, else nbd, else fuse), ublk, nbd, fuse, or none (the NBD export only).
        #[arg(long)]
        frontend: Option<String>,
    },
    Detach {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Change the number of replicas (updateReplicaCount).
    Replicas {
        name: String,
        count: u64,
    },
    /// Grow a detached volume (e.g. --size 20Gi); the new range reads as zeros.
    Expand {
        name: String,
        #[arg(long)]
        size: String,
    },
}

#[derive(Subcommand)]
pub enum SnapshotSub {
    Ls {
        volume: String,
    },
    Create {
        volume: String,
        name: Option<String>,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    Rm {
        volume: String,
        name: String,
    },
    Revert {
        volume: String,
        name: String,
    },
    Purge {
        volume: String,
    },
    /// Back up a snapshot (a new one when no name is given) to the backup target.
    Backup {
        volume: String,
        name: Option<String>,
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum BackupSub {
    /// The backup volumes in the backup target.
    Volumes,
    /// The backups of one backup volume.
    Ls {
        volume: String,
    },
    Rm {
        volume: String,
        name: String,
    },
    /// Restore a backup (its URL) into a new volume.
    Restore {
        /// The backup's URL (`backup ls --json` shows it). Not `url`: that is the
        /// manager's address (--url).
        #[arg(value_name = "BACKUP_URL")]
        backup_url: String,
        volume: String,
        #[arg(long)]
        replicas: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum JobSub {
    Ls {
        volume: String,
    },
    /// Add jobs: a JSON list, e.g. '[{"name":"snap","task":"snapshot","cron":"*/5 * * * *","retain":3}]'.
    Add {
        volume: String,
        jobs: String,
    },
    Rm {
        volume: String,
        name: String,
    },
}

#[derive(Subcommand)]
pub enum SettingSub {
    Get { name: String },
    Set { name: String, value: String },
}

/// The manager's client shared with the CSI driver (csi/src/manager.rs); errors carry
/// the HTTP status, which the operator sees.
struct Client(longhorn_csi::manager::Manager);

impl Client {
    fn new(c: &Conn) -> Result<Client> {
        let token = match &c.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading the token file {}", p.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let roots = match &c.ca {
            Some(p) => Some(longhorn_csi::manager::Roots::read(p).map_err(|e| anyhow!("--ca {e}"))?),
            None if c.url.starts_with("https://") => bail!("--url {}: https needs --ca (the CA that signed the manager's certificate)", c.url),
            None => None,
        };
        Ok(Client(longhorn_csi::manager::Manager::for_cli(&c.url, token, roots.as_ref())))
    }

    /// One request; the API's JSON answer, or its error message with the HTTP status.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.0.call(method, path, body).map_err(|e| match e.status {
            0 => anyhow!("{method} {path}: {} (is `longhorn manager serve` running?)", e.message),
            s => anyhow!("{} (HTTP {s})", e.message),
        })
    }

    fn action(&self, volume: &str, action: &str, body: Value) -> Result<Value> {
        self.call("POST", &format!("/v1/volumes/{}?action={action}", path_part(volume)?), Some(body))
    }
}

/// A name as one path segment; the server validates names, this only keeps the URL whole.
fn path_part(s: &str) -> Result<&str> {
    if s.is_empty() || s.contains(['/', '?', '#', '%', ' ']) {
        bail!("{s:?} is not a valid name");
    }
    Ok(s)
}

fn data(v: &Value) -> &Value {
    v.get("data").unwrap_or(v)
}

fn size_cell(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.parse::<u64>().map(table::human_size).unwrap_or_else(|_| s.clone()),
        Some(Value::Number(n)) => n.as_u64().map(table::human_size).unwrap_or_else(|| n.to_string()),
        _ => "-".into(),
    }
}

pub fn run(conn: &Conn, cmd: ApiCmd) -> Result<()> {
    let c = Client::new(conn)?;
    let (v, show): (Value, fn(&Value)) = match cmd {
        ApiCmd::Volume(s) => match s {
            VolumeSub::Ls => (c.call("GET", "/v1/volumes", None)?, volumes),
            VolumeSub::Get { name } => (c.call("GET", &format!("/v1/volumes/{}", path_part(&name)?), None)?, volume),
            VolumeSub::Create { name, size, replicas, stale_replica_timeout, from_backup, access_mode, recurring_jobs } => {
                let mut b = json!({"name": name, "size": size});
                if let Some(n) = replicas {
                    b["numberOfReplicas"] = json!(n);
                }
                if let Some(t) = stale_replica_timeout {
                    b["staleReplicaTimeout"] = json!(t);
                }
                if let Some(u) = from_backup {
                    b["fromBackup"] = json!(u);
                }
                if let Some(m) = access_mode {
                    b["accessMode"] = json!(m);
                }
                if let Some(j) = recurring_jobs {
                    b["recurringJobs"] = serde_json::from_str(&j).context("--recurring-jobs is not JSON")?;
                }
                (c.call("POST", "/v1/volumes", Some(b))?, volume)
            }
            VolumeSub::Attach { name, frontend } => {
                let body = match frontend.as_deref() {
                    Some("none") => json!({"disableFrontend": true}),
                    Some(f) => json!({"frontend": f}),
                    None => json!({}),
                };
                (c.action(&name, "attach", body)?, volume)
            }
            VolumeSub::Detach { name } => (c.action(&name, "detach", json!({}))?, volume),
            VolumeSub::Delete { name } => (c.call("DELETE", &format!("/v1/volumes/{}", path_part(&name)?), None)?, volume),
            VolumeSub::Replicas { name, count } => {
                (c.action(&name, "updateReplicaCount", json!({"replicaCount": count}))?, volume)
            }
            VolumeSub::Expand { name, size } => (c.action(&name, "expand", json!({"size": size}))?, volume),
        },
        ApiCmd::Snapshot(s) => match s {
            SnapshotSub::Ls { volume } => (c.action(&volume, "snapshotList", json!({}))?, snapshots),
            SnapshotSub::Create { volume, name, labels } => {
                let mut b = json!({"labels": parse_labels(&labels)?});
                if let Some(n) = name {
                    b["name"] = json!(n);
                }
                (c.action(&volume, "snapshotCreate", b)?, snapshots)
            }
            SnapshotSub::Rm { volume, name } => (c.action(&volume, "snapshotDelete", json!({"name": name}))?, plain),
            SnapshotSub::Revert { volume, name } => (c.action(&volume, "snapshotRevert", json!({"name": name}))?, plain),
            SnapshotSub::Purge { volume } => (c.action(&volume, "snapshotPurge", json!({}))?, plain),
            SnapshotSub::Backup { volume, name, labels } => {
                let mut b = json!({"labels": parse_labels(&labels)?});
                if let Some(n) = name {
                    b["name"] = json!(n);
                }
                (c.action(&volume, "snapshotBackup", b)?, plain)
            }
        },
        ApiCmd::Backup(s) => match s {
            BackupSub::Volumes => (c.call("GET", "/v1/backupvolumes", None)?, backup_volumes),
            BackupSub::Ls { volume } => (
                c.call("POST", &format!("/v1/backupvolumes/{}?action=backupList", path_part(&volume)?), Some(json!({})))?,
                backups,
            ),
            BackupSub::Rm { volume, name } => (
                c.call(
                    "POST",
                    &format!("/v1/backupvolumes/{}?action=backupDelete", path_part(&volume)?),
                    Some(json!({"name": name})),
                )?,
                plain,
            ),
            BackupSub::Restore { backup_url, volume: name, replicas } => {
                // The new volume takes the backup's size.
                let mut b = json!({"name": name, "fromBackup": backup_url});
                if let Some(n) = replicas {
                    b["numberOfReplicas"] = json!(n);
                }
                (c.call("POST", "/v1/volumes", Some(b))?, volume)
            }
        },
        ApiCmd::Job(s) => match s {
            JobSub::Ls { volume } => (c.action(&volume, "recurringJobList", json!({}))?, jobs),
            JobSub::Add { volume, jobs: j } => {
                let list: Value = serde_json::from_str(&j).context("the job list is not JSON")?;
                (c.action(&volume, "recurringJobAdd", json!({"jobs": list}))?, plain)
            }
            JobSub::Rm { volume, name } => (c.action(&volume, "recurringJobDelete", json!({"name": name}))?, plain),
        },
        ApiCmd::Setting(s) => match s {
            SettingSub::Get { name } => (c.call("GET", &format!("/v1/settings/{}", path_part(&name)?), None)?, setting),
            SettingSub::Set { name, value } => (
                c.call("PUT", &format!("/v1/settings/{}", path_part(&name)?), Some(json!({"value": value})))?,
                setting,
            ),
        },
    };
    if conn.json {
        print_json(&v);
    } else {
        show(&v);
    }
    Ok(())
}

fn plain(v: &Value) {
    print_json(v);
}

fn volumes(v: &Value) {
    let rows = table::rows(data(v), |x| {
        vec![
            table::s(x, "name"),
            table::s(x, "state"),
            table::s(x, "robustness"),
            size_cell(x, "size"),
            size_cell(x, "actualSize"),
            table::s(x, "numberOfReplicas"),
            table::s(x, "frontend"),
            table::s(x, "endpoint"),
            table::s(x, "accessMode"),
        ]
    });
    table::print(&["NAME", "STATE", "ROBUSTNESS", "SIZE", "ACTUAL", "REPLICAS", "FRONTEND", "DEVICE", "ACCESS"], &rows);
}

fn volume(v: &Value) {
    volumes(&json!([v]));
    if let Some(rs) = v.get("replicas").filter(|r| r.is_array()) {
        println!();
        let rows = table::rows(rs, |r| {
            vec![table::s(r, "name"), table::s(r, "address"), table::s(r, "mode"), table::s(r, "rebuildProgress")]
        });
        table::print(&["REPLICA", "ADDRESS", "MODE", "REBUILD"], &rows);
    }
}

fn snapshots(v: &Value) {
    let list = if data(v).is_array() { data(v).clone() } else { json!([v]) };
    let rows = table::rows(&list, |x| {
        vec![
            table::s(x, "name"),
            table::s(x, "parent"),
            table::s(x, "created"),
            size_cell(x, "size"),
            table::s(x, "usercreated"),
            table::s(x, "removed"),
        ]
    });
    table::print(&["NAME", "PARENT", "CREATED", "SIZE", "USER", "REMOVED"], &rows);
}

fn backup_volumes(v: &Value) {
    let rows = table::rows(data(v), |x| {
        vec![
            table::s(x, "name"),
            table::s(x, "created"),
            table::s(x, "lastBackupName"),
            table::s(x, "lastBackupAt"),
            table::s(x, "lastSyncedAt"),
        ]
    });
    table::print(&["NAME", "CREATED AT", "LAST BACKUP", "LAST BACKUP AT", "LAST SYNCED AT"], &rows);
}

fn backups(v: &Value) {
    let rows = table::rows(data(v), |x| {
        vec![
            table::s(x, "name"),
            table::s(x, "snapshotName"),
            size_cell(x, "size"),
            table::s(x, "created"),
            table::s(x, "state"),
            table::s(x, "url"),
        ]
    });
    table::print(&["NAME", "SNAPSHOT", "SIZE", "CREATED", "STATE", "URL"], &rows);
}

fn jobs(v: &Value) {
    let rows = table::rows(data(v), |x| {
        vec![
            table::s(x, "name"),
            table::s(x, "task"),
            table::s(x, "cron"),
            table::s(x, "retain"),
            table::s(x, "nextRun"),
            table::s(x, "lastResult"),
        ]
    });
    table::print(&["NAME", "TASK", "CRON", "RETAIN", "NEXT RUN", "LAST RESULT"], &rows);
}

fn setting(v: &Value) {
    println!("{} = {}", table::s(v, "name"), table::s(v, "value"));
}
