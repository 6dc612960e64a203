//! `longhorn job ...`: recurring jobs of a running volume, and the engine's handlers.

use crate::{print_json, table, VolumeRef};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use longhorn_engine::control;
use longhorn_engine::jobs::Scheduler;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum JobCmd {
    /// Add (or replace, by name) recurring jobs, given as a StorageClass-style JSON
    /// list: '[{"name":"snap","task":"snapshot","cron":"*/5 * * * *","retain":3}]'.
    Add(AddArgs),
    /// The jobs, with their next run and last result.
    Ls(VolumeRef),
    /// Remove a recurring job (what it made stays).
    Rm(RmArgs),
    /// Move an engine's manual clock forward (engines started with --manual-clock).
    Clock(ClockArgs),
}

#[derive(Args)]
pub struct AddArgs {
    /// The JSON list; or use --file.
    pub jobs: Option<String>,
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub vol: VolumeRef,
}

#[derive(Args)]
pub struct RmArgs {
    pub name: String,
    #[command(flatten)]
    pub vol: VolumeRef,
}

#[derive(Args)]
pub struct ClockArgs {
    /// Seconds to move forward.
    #[arg(long)]
    pub advance: i64,
    #[command(flatten)]
    pub vol: VolumeRef,
}

fn call(v: &VolumeRef, req: Value) -> Result<Value> {
    control::call(&v.common.run_dir, &v.volume, &req).map_err(|e| anyhow!(e))
}

pub fn run(c: JobCmd) -> Result<()> {
    match c {
        JobCmd::Add(a) => {
            let text = match (&a.jobs, &a.file) {
                (Some(j), None) => j.clone(),
                (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                _ => bail!("give the jobs as one JSON argument or with --file"),
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("the jobs are not JSON: {e}"))?;
            // Checked here too, so a bad spec fails before it reaches the engine.
            longhorn_engine::jobs::parse_jobs(&v).map_err(|e| anyhow!(e))?;
            let r = call(&a.vol, json!({"cmd": "job-add", "jobs": v}))?;
            println!("added: {}", r.as_array().map(|a| a.iter().filter_map(|n| n.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default());
        }
        JobCmd::Ls(v) => {
            let r = call(&v, json!({"cmd": "job-ls"}))?;
            if v.common.json {
                print_json(&r);
            } else {
                let rows = table::rows(&r, |j| {
                    ["name", "task", "cron", "retain", "next_run", "last_run", "last_result"].map(|k| table::s(j, k)).to_vec()
                });
                table::print(&["NAME", "TASK", "CRON", "RETAIN", "NEXT RUN", "LAST RUN", "LAST RESULT"], &rows);
            }
        }
        JobCmd::Rm(a) => {
            call(&a.vol, json!({"cmd": "job-rm", "name": a.name}))?;
            println!("job {} removed", a.name);
        }
        JobCmd::Clock(a) => {
            let r = call(&a.vol, json!({"cmd": "job-clock", "advance": a.advance}))?;
            println!("{}", r.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// The engine side of `job-*` control requests.
pub fn control(s: &Arc<Scheduler>, cmd: &str, req: &Value) -> std::result::Result<Value, String> {
    match cmd {
        "job-add" => s.add(req.get("jobs").unwrap_or(&Value::Null)).map(|n| json!(n)),
        "job-ls" => serde_json::to_value(s.list()).map_err(|e| e.to_string()),
        "job-rm" => {
            let name = req.get("name").and_then(|n| n.as_str()).ok_or("request has no \"name\"")?;
            s.remove(name).map(|_| Value::Null)
        }
        "job-clock" => {
            let secs = req.get("advance").and_then(|n| n.as_i64()).ok_or("request has no \"advance\"")?;
            s.advance(secs).map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// Gives the scheduler its way to take backups: to the installation's backup target
/// (the settings file, read at each run so `backup target` changes apply), with the
/// engine's own AWS_* environment for S3.
pub fn wire_backups(s: &Arc<Scheduler>) {
    s.set_backup(Arc::new(|v, job, labels, retain| run_backup(v, job, labels, retain)));
}

fn settings_path() -> PathBuf {
    std::env::var_os("LONGHORN_SETTINGS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/longhorn/settings.json"))
}

fn run_backup(
    v: &Arc<longhorn_engine::Volume>,
    job: &str,
    labels: &std::collections::HashMap<String, String>,
    retain: u32,
) -> std::result::Result<String, String> {
    use longhorn_engine::backup::{self, target};
    let url = crate::backup::read_target(&settings_path()).map_err(|e| format!("{e:#}"))?;
    let env = target::env_from_process();
    let req = backup::CreateRequest { target: url.clone(), env: env.clone(), labels: labels.clone(), ..Default::default() };
    let p = backup::start(v, req).map_err(|e| e.to_string())?;
    let name = p.backup.clone();
    // Recurring backups run one at a time on the scheduler's thread: wait for this one.
    let done = loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let st = backup::status(Some(&name));
        match st.last() {
            Some(p) if p.state == "in-progress" => continue,
            Some(p) => break p.clone(),
            None => return Err(format!("backup {name} vanished from the engine's status")),
        }
    };
    if done.state != "complete" {
        return Err(format!("backup {name}: {}", done.error));
    }
    // Retention: this job's complete backups beyond `retain`, oldest first.
    let t: Arc<dyn target::BackupTarget> = Arc::from(target::open(&url, &env).map_err(|e| e.to_string())?);
    let mut mine: Vec<_> = backup::list_backups(t.as_ref(), Some(v.name()))
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|b| b.state == "complete" && b.labels.get(longhorn_engine::jobs::LABEL).map(|s| s.as_str()) == Some(job))
        // The one just made is kept whatever the clock says (times have 1 s resolution).
        .filter(|b| b.name != name)
        .collect();
    // Completion order (nanoseconds, kept increasing per volume), never CreatedTime.
    mine.sort_by(|a, b| (a.created_unix_nano, &a.name).cmp(&(b.created_unix_nano, &b.name)));
    let excess = mine.len().saturating_sub(retain.saturating_sub(1) as usize);
    let mut removed = Vec::new();
    for b in mine.iter().take(excess) {
        backup::delete_backup(t.clone(), v.name(), &b.name).map_err(|e| format!("retention: deleting {}: {e}", b.name))?;
        removed.push(b.name.clone());
    }
    Ok(if removed.is_empty() { name } else { format!("{name}; removed {}", removed.join(", ")) })
}
