//! `longhorn backup ...`: the backup target setting, backups of running volumes (taken
//! by their engine), and the commands that need only the backupstore (ls, volumes, rm,
//! restore), which run in this process.

use crate::snapshot::parse_labels;
use crate::{print_json, table};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use longhorn_engine::backup::{self, target, BackupError};
use longhorn_engine::{control, Volume};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct Common {
    /// The settings file that holds the backup target.
    #[arg(long, default_value = "/var/lib/longhorn/settings.json", env = "LONGHORN_SETTINGS", global = true)]
    pub settings: PathBuf,
    /// Use this backup target instead of the configured one.
    #[arg(long, global = true)]
    pub target: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Args)]
pub struct BackupCmd {
    #[command(subcommand)]
    cmd: Sub,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum Sub {
    /// Show or set the backup target: file:///path (or vfs:///path),
    /// nfs://host:/export/path, s3://bucket@region/prefix.
    Target {
        url: Option<String>,
    },
    /// Back up a running volume from a snapshot (a new one unless --snapshot).
    Create(CreateArgs),
    /// Progress of a running volume's backups.
    Status {
        #[arg(long, short = 'v', value_parser = crate::volume_name)]
        volume: String,
        name: Option<String>,
        #[arg(long, default_value = crate::DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
        run_dir: PathBuf,
    },
    /// The backups in the store (of VOLUME, or of all volumes).
    Ls {
        volume: Option<String>,
    },
    /// The volumes in the store.
    Volumes,
    /// Remove a backup, and every block no other backup of its volume uses.
    Rm {
        /// Backup name or URL.
        name: String,
        #[arg(long, short = 'v')]
        volume: Option<String>,
    },
    /// Restore a backup into a new volume (replica directories under DATA_DIR/NEWVOL).
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long, short = 'v', value_parser = crate::volume_name)]
    pub volume: String,
    /// Back up this snapshot instead of taking a new one.
    #[arg(long)]
    pub snapshot: Option<String>,
    /// A label `key=value`; repeat for more.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// lz4 (default), gzip or none. A volume already in the store keeps its method.
    #[arg(long, default_value = "lz4")]
    pub compression: String,
    /// Return once the backup has started.
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = crate::DEFAULT_RUN_DIR, env = "LONGHORN_RUN_DIR")]
    pub run_dir: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Backup name or URL (TARGET?backup=NAME&volume=VOL). Omit with --latest.
    pub backup: Option<String>,
    /// Restore the newest complete backup of --volume.
    #[arg(long)]
    pub latest: bool,
    /// The backed-up volume (needed with --latest; found by search otherwise).
    #[arg(long, short = 'v')]
    pub volume: Option<String>,
    /// The new volume's name.
    #[arg(long, value_parser = crate::volume_name)]
    pub to: String,
    #[arg(long, default_value = "/var/lib/longhorn")]
    pub data_dir: PathBuf,
    /// Replica directories to make.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
}

pub fn read_target(settings: &Path) -> Result<String> {
    let raw = match std::fs::read(settings) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no backup target is set: run `longhorn backup target URL` (settings file {})", settings.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", settings.display())),
    };
    let v: Value = serde_json::from_slice(&raw).with_context(|| format!("{} is not valid JSON", settings.display()))?;
    match v.get("backup-target").and_then(|t| t.as_str()) {
        Some(t) if !t.is_empty() => Ok(t.to_string()),
        _ => bail!("no backup target is set: run `longhorn backup target URL` (settings file {})", settings.display()),
    }
}

fn target_url(c: &Common) -> Result<String> {
    match &c.target {
        Some(t) => Ok(t.clone()),
        None => read_target(&c.settings),
    }
}

fn open_target(url: &str) -> Result<Arc<dyn target::BackupTarget>> {
    Ok(Arc::from(target::open(url, &target::env_from_process()).map_err(|e| anyhow!(e))?))
}

fn be(e: BackupError) -> anyhow::Error {
    anyhow!(e)
}

fn set_target(settings: &Path, url: &str) -> Result<()> {
    target::open(url, &target::env_from_process()).map_err(be)?;
    let mut v: Value = std::fs::read(settings).ok().and_then(|r| serde_json::from_slice(&r).ok()).unwrap_or_else(|| json!({}));
    v["backup-target"] = json!(url);
    if let Some(d) = settings.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = settings.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, settings).with_context(|| format!("writing {}", settings.display()))?;
    Ok(())
}

fn progress_line(p: &Value) -> String {
    let total = p["blocks_total"].as_u64().unwrap_or(0);
    let done = p["blocks_done"].as_u64().unwrap_or(0);
    let pct = if total == 0 { 100 } else { done * 100 / total };
    format!(
        "{pct:3}% {done}/{total} blocks, {} uploaded, {} already stored",
        p["blocks_uploaded"].as_u64().unwrap_or(0),
        p["blocks_existing"].as_u64().unwrap_or(0)
    )
}

pub fn run(b: BackupCmd) -> Result<()> {
    let c = b.common;
    match b.cmd {
        Sub::Target { url: None } => {
            let t = read_target(&c.settings)?;
            if c.json {
                print_json(&json!({"backup-target": t}));
            } else {
                println!("{t}");
            }
        }
        Sub::Target { url: Some(u) } => {
            set_target(&c.settings, &u)?;
            println!("backup target set to {u}");
        }
        Sub::Create(a) => {
            let url = target_url(&c)?;
            let labels = parse_labels(&a.labels)?;
            let crash: Option<u64> = std::env::var("LONGHORN_BACKUP_CRASH_AFTER_BLOCKS").ok().and_then(|s| s.parse().ok());
            let req = json!({
                "cmd": "backup-create", "target": url, "env": target::env_from_process(), "snapshot": a.snapshot,
                "labels": labels, "compression": a.compression, "crash_after_blocks": crash,
            });
            let r = control::call(&a.run_dir, &a.volume, &req).map_err(|e| anyhow!(e))?;
            let name = r["backup"].as_str().unwrap_or("").to_string();
            eprintln!("backup {name} of {} from snapshot {} started", a.volume, r["snapshot"].as_str().unwrap_or(""));
            if a.no_wait {
                if c.json { print_json(&r) } else { println!("{name}") }
                return Ok(());
            }
            let mut last = String::new();
            let fin = loop {
                std::thread::sleep(Duration::from_millis(250));
                let s = control::call(&a.run_dir, &a.volume, &json!({"cmd": "backup-status", "name": name})).map_err(|e| anyhow!(e))?;
                let p = s.as_array().and_then(|l| l.last().cloned()).ok_or_else(|| anyhow!("the engine lost track of backup {name}"))?;
                let line = progress_line(&p);
                if line != last {
                    eprintln!("{line}");
                    let _ = std::io::stderr().flush();
                    last = line;
                }
                match p["state"].as_str() {
                    Some("in-progress") => continue,
                    Some("complete") => break p,
                    _ => bail!("backup {name} failed: {}", p["error"].as_str().unwrap_or("unknown error")),
                }
            };
            if c.json {
                print_json(&fin);
            } else {
                let ms = fin["elapsed_ms"].as_u64().unwrap_or(0).max(1);
                println!(
                    "{name} {} backup of {} in {:.1} s: {} blocks read, {} uploaded ({}), {} already stored, {:.0} MiB/s",
                    if fin["incremental"].as_bool() == Some(true) { "incremental" } else { "full" },
                    a.volume,
                    ms as f64 / 1000.0,
                    fin["blocks_total"],
                    fin["blocks_uploaded"],
                    table::human_size(fin["bytes_uploaded"].as_u64().unwrap_or(0)),
                    fin["blocks_existing"],
                    fin["bytes_read"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64 / (ms as f64 / 1000.0)
                );
            }
        }
        Sub::Status { volume, name, run_dir } => {
            let s = control::call(&run_dir, &volume, &json!({"cmd": "backup-status", "name": name})).map_err(|e| anyhow!(e))?;
            if c.json {
                print_json(&s);
            } else {
                for p in s.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
                    println!("{} {} {} {}", p["backup"].as_str().unwrap_or(""), p["state"].as_str().unwrap_or(""), progress_line(p), p["error"].as_str().unwrap_or(""));
                }
            }
        }
        Sub::Ls { volume } => {
            let t = open_target(&target_url(&c)?)?;
            let l = backup::list_backups(&*t, volume.as_deref()).map_err(be)?;
            if c.json {
                print_json(&serde_json::to_value(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|b| {
                        let mut labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        labels.sort();
                        vec![
                            b.name.clone(), b.volume.clone(), b.snapshot.clone(), b.snapshot_created_at.clone(), b.created.clone(),
                            b.state.clone(), table::human_size(b.size), if b.incremental { "incremental" } else { "full" }.into(),
                            labels.join(","),
                        ]
                    })
                    .collect();
                table::print(&["NAME", "VOLUME", "SNAPSHOT", "SNAPSHOTCREATEDAT", "CREATEDAT", "STATE", "SIZE", "TYPE", "LABELS"], &rows);
            }
        }
        Sub::Volumes => {
            let t = open_target(&target_url(&c)?)?;
            let l = backup::list_volumes(&*t).map_err(be)?;
            if c.json {
                print_json(&serde_json::to_value(&l)?);
            } else {
                let rows: Vec<Vec<String>> = l
                    .iter()
                    .map(|v| vec![v.name.clone(), v.created_at.clone(), v.last_backup_name.clone(), v.last_backup_at.clone(), v.last_synced_at.clone()])
                    .collect();
                table::print(&["NAME", "CREATEDAT", "LASTBACKUPNAME", "LASTBACKUPAT", "LASTSYNCEDAT"], &rows);
            }
        }
        Sub::Rm { name, volume } => {
            let (url, vol, name) = resolve(&c, &name, volume.as_deref())?;
            let t = open_target(&url)?;
            let vol = match vol {
                Some(v) => v,
                None => backup::find_backup(&*t, &name).map_err(be)?,
            };
            let r = backup::delete_backup(t, &vol, &name).map_err(be)?;
            if c.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                println!("backup {name} of {vol} removed; {} blocks removed, {} left", r.blocks_removed, r.blocks_left);
            }
        }
        Sub::Restore(a) => {
            let r = restore_cmd(&c, &a)?;
            if c.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                let s = r.elapsed_ms.max(1) as f64 / 1000.0;
                println!(
                    "restored {} into volume {} ({}, {} blocks, {:.1} s, {:.0} MiB/s): {}",
                    r.from,
                    r.volume,
                    table::human_size(r.size),
                    r.blocks,
                    s,
                    r.bytes_read as f64 / (1 << 20) as f64 / s,
                    r.dir.display()
                );
            }
        }
    }
    Ok(())
}

/// A backup given by name or by URL: (target URL, volume if known, backup name).
fn resolve(c: &Common, b: &str, volume: Option<&str>) -> Result<(String, Option<String>, String)> {
    if let Some((t, v, n)) = backup::parse_backup_url(b) {
        return Ok((t, Some(v), n));
    }
    if b.contains("://") {
        bail!("backup URL {b:?} lacks ?backup=NAME&volume=VOL");
    }
    Ok((target_url(c)?, volume.map(|s| s.to_string()), b.to_string()))
}

/// Restores as `backup restore` says; used by `up --from-backup` too.
pub fn restore_cmd(c: &Common, a: &RestoreArgs) -> Result<backup::RestoreResult> {
    let (url, vol, name) = match (&a.backup, a.latest) {
        (Some(_), true) => bail!("give a backup or --latest, not both"),
        (None, false) => bail!("which backup? give its name or URL, or --latest -v VOLUME"),
        (Some(b), false) => resolve(c, b, a.volume.as_deref())?,
        (None, true) => {
            let v = a.volume.clone().ok_or_else(|| anyhow!("--latest needs -v VOLUME (the backed-up volume)"))?;
            (target_url(c)?, Some(v), String::new())
        }
    };
    let t = open_target(&url)?;
    let vol = match vol {
        Some(v) => v,
        None => backup::find_backup(&*t, &name).map_err(be)?,
    };
    let name = if a.latest { backup::latest_backup(&*t, &vol).map_err(be)? } else { name };
    eprintln!("restoring backup {name} of {vol} into {}", a.data_dir.join(&a.to).display());
    let last = std::sync::atomic::AtomicU64::new(u64::MAX);
    let show = |done: u64, total: u64| {
        let pct = if total == 0 { 100 } else { done * 100 / total };
        if last.swap(pct, std::sync::atomic::Ordering::AcqRel) != pct && (pct % 10 == 0 || done == total) {
            eprintln!("{pct:3}% {done}/{total} blocks");
        }
    };
    backup::restore(t, &vol, &name, &a.data_dir, &a.to, a.replicas, &show).map_err(be)
}

/// `up --from-backup`: restores `backup` as `volume` unless the volume exists already.
pub fn restore_for_up(backup: &str, data_dir: &Path, volume: &str, replicas: usize, size: u64) -> Result<()> {
    if data_dir.join(volume).join("replica-0").join(longhorn_replica::meta::VOLUME_META).exists() {
        eprintln!("volume {volume} exists in {}; --from-backup is not applied again", data_dir.display());
        return Ok(());
    }
    let settings = std::env::var_os("LONGHORN_SETTINGS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/longhorn/settings.json"));
    let c = Common { settings, target: None, json: false };
    let a = RestoreArgs { backup: Some(backup.to_string()), latest: false, volume: None, to: volume.to_string(), data_dir: data_dir.to_path_buf(), replicas };
    let r = restore_cmd(&c, &a)?;
    if r.size != size {
        let _ = std::fs::remove_dir_all(&r.dir);
        bail!("backup {backup} is of a {} byte volume, but --size says {size}", r.size);
    }
    eprintln!("volume {volume} restored from {} ({} blocks)", r.from, r.blocks);
    Ok(())
}

/// The engine side of `backup-*` control requests.
pub fn control(v: &Arc<Volume>, cmd: &str, req: &Value) -> std::result::Result<Value, String> {
    match cmd {
        "backup-create" => {
            let r: backup::CreateRequest = serde_json::from_value(req.clone()).map_err(|e| format!("backup-create: {e}"))?;
            let p = backup::start(v, r).map_err(|e| e.to_string())?;
            serde_json::to_value(p).map_err(|e| e.to_string())
        }
        "backup-status" => serde_json::to_value(backup::status(req.get("name").and_then(|n| n.as_str()))).map_err(|e| e.to_string()),
        other => Err(format!("unknown command {other:?}")),
    }
}

