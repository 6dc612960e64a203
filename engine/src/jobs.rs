//! Recurring snapshot and backup jobs, in the JSON form of a Longhorn StorageClass's
//! `recurringJobs` parameter:
//!
//! ```json
//! [{"name":"snap","task":"snapshot","cron":"*/1 * * * *","retain":1},
//!  {"name":"backup","task":"backup","cron":"*/2 * * * *","retain":1,"labels":{"k":"v"}}]
//! ```
//!
//! Rules: `name` unique in the list and 1-8 characters of `[a-z0-9-]`; `task` one of
//! `snapshot`, `backup`, `snapshot-force-create`, `backup-force-create`; `cron` a
//! standard 5-field expression; `retain` at least 1 (and at most 250, a chain's limit);
//! `labels` an optional string map. Any other field is an error. A list is validated
//! whole before anything of it is applied.
//!
//! Running: a job whose time has come runs once (missed slots are not replayed). A
//! recurring snapshot is skipped when the head holds no new data, a recurring backup
//! when nothing was written since the last backup this engine took (the force variants
//! always run). What a job makes carries the label `RecurringJob=<name>`; retention
//! removes that job's own oldest ones beyond `retain`, and nothing else. A failing job
//! records its error, is retried at its next slot, and never stops the others.
//!
//! Time comes from a [`Clock`]: the system clock, or a manual one that tests advance
//! through the control API, so schedules are tested without waiting minutes.

use crate::volume::Volume;
use chrono::{DateTime, Utc};
use croner::Cron;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tracing::{info, warn};

pub const LABEL: &str = "RecurringJob";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    Snapshot,
    Backup,
    SnapshotForceCreate,
    BackupForceCreate,
}

impl Task {
    fn parse(s: &str) -> Option<Task> {
        Some(match s {
            "snapshot" => Task::Snapshot,
            "backup" => Task::Backup,
            "snapshot-force-create" => Task::SnapshotForceCreate,
            "backup-force-create" => Task::BackupForceCreate,
            _ => return None,
        })
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Task::Snapshot => "snapshot",
            Task::Backup => "backup",
            Task::SnapshotForceCreate => "snapshot-force-create",
            Task::BackupForceCreate => "backup-force-create",
        }
    }
    fn is_backup(&self) -> bool {
        matches!(self, Task::Backup | Task::BackupForceCreate)
    }
    fn forced(&self) -> bool {
        matches!(self, Task::SnapshotForceCreate | Task::BackupForceCreate)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RecurringJob {
    pub name: String,
    pub task: Task,
    pub cron: String,
    pub retain: u32,
    pub labels: HashMap<String, String>,
}

impl RecurringJob {
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "name": self.name, "task": self.task.as_str(), "cron": self.cron,
            "retain": self.retain, "labels": self.labels,
        })
    }
}

/// Parses a 5-field cron expression.
pub fn parse_cron(s: &str) -> Result<Cron, String> {
    let fields = s.split_whitespace().count();
    if fields != 5 {
        return Err(format!("{s:?} has {fields} fields; a cron expression has 5 (minute hour day month weekday)"));
    }
    // croner takes an empty list element ("1,", ",") without complaint, as a set it
    // then searches for a match for hundreds of milliseconds; no cron means anything
    // by it.
    if let Some(f) = s.split_whitespace().find(|f| f.split(',').any(str::is_empty)) {
        return Err(format!("{s:?}: field {f:?} has an empty list element"));
    }
    Cron::from_str(s).map_err(|e| format!("{s:?} is not a valid cron expression: {e}"))
}

/// Validates a whole `recurringJobs` list; errors name the job and the field.
pub fn parse_jobs(v: &Value) -> Result<Vec<RecurringJob>, String> {
    let arr = v.as_array().ok_or("recurringJobs must be a JSON list")?;
    let mut out: Vec<RecurringJob> = Vec::new();
    for (i, j) in arr.iter().enumerate() {
        let obj = j.as_object().ok_or(format!("recurringJobs[{i}] is not an object"))?;
        let name = obj.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let at = if name.is_empty() { format!("recurringJobs[{i}]") } else { format!("recurringJobs[{i}] ({name:?})") };
        for k in obj.keys() {
            if !matches!(k.as_str(), "name" | "task" | "cron" | "retain" | "labels" | "groups" | "concurrency") {
                return Err(format!("{at}: unknown field {k:?}"));
            }
        }
        match obj.get("name") {
            Some(Value::String(_)) => {}
            _ => return Err(format!("{at}: field \"name\" is required and must be a string")),
        }
        longhorn_replica::names::check("job", name).map_err(|e| format!("{at}: field \"name\": {e}"))?;
        if name.chars().count() > 8 {
            return Err(format!("{at}: field \"name\" must be 1 to 8 characters, not {}", name.chars().count()));
        }
        if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(format!("{at}: field \"name\" may hold only a-z, 0-9 and '-'"));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(format!("{at}: field \"name\": {name:?} is used by another job"));
        }
        let task_s = obj.get("task").and_then(|t| t.as_str()).ok_or(format!("{at}: field \"task\" is required"))?;
        let task = Task::parse(task_s).ok_or(format!(
            "{at}: field \"task\": {task_s:?} is not one of snapshot, backup, snapshot-force-create, backup-force-create"
        ))?;
        let cron = obj.get("cron").and_then(|c| c.as_str()).ok_or(format!("{at}: field \"cron\" is required"))?;
        parse_cron(cron).map_err(|e| format!("{at}: field \"cron\": {e}"))?;
        let retain = match obj.get("retain") {
            Some(Value::Number(n)) => n.as_u64().ok_or(format!("{at}: field \"retain\" must be a whole number"))?,
            None => return Err(format!("{at}: field \"retain\" is required")),
            Some(_) => return Err(format!("{at}: field \"retain\" must be a number")),
        };
        if !(1..=250).contains(&retain) {
            return Err(format!("{at}: field \"retain\" must be between 1 and 250, not {retain}"));
        }
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => HashMap::new(),
            Some(l) => serde_json::from_value(l.clone()).map_err(|_| format!("{at}: field \"labels\" must map strings to strings"))?,
        };
        out.push(RecurringJob { name: name.to_string(), task, cron: cron.to_string(), retain: retain as u32, labels });
    }
    Ok(out)
}

/// `t` moved by `secs` seconds (the control API's `job-clock`). chrono panics on a
/// duration or a date out of its range, so both are checked: the number comes from a
/// client.
pub fn advance_clock(t: DateTime<Utc>, secs: i64) -> Result<DateTime<Utc>, String> {
    chrono::Duration::try_seconds(secs)
        .and_then(|d| t.checked_add_signed(d))
        .ok_or_else(|| format!("cannot move the clock by {secs} seconds from {t}: out of range"))
}

/// Where time comes from.
pub enum Clock {
    System,
    Manual(Mutex<DateTime<Utc>>),
}

impl Clock {
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Manual(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// What a backup job needs from the backup subsystem: take a backup of a new snapshot
/// with these labels, and keep only the newest `retain` backups carrying
/// `RecurringJob=<job>`. Returns the backup's name.
pub type BackupFn = dyn Fn(&Arc<Volume>, &str, &HashMap<String, String>, u32) -> Result<String, String> + Send + Sync;

#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub name: String,
    pub task: String,
    pub cron: String,
    pub retain: u32,
    pub labels: HashMap<String, String>,
    pub next_run: String,
    pub last_run: String,
    pub last_result: String,
}

struct Job {
    spec: RecurringJob,
    cron: Cron,
    next: Option<DateTime<Utc>>,
    last_run: Option<DateTime<Utc>>,
    last_result: String,
}

impl Job {
    fn new(spec: RecurringJob, now: DateTime<Utc>) -> Result<Job, String> {
        let cron = parse_cron(&spec.cron)?;
        let next = cron.find_next_occurrence(&now, false).ok();
        Ok(Job { spec, cron, next, last_run: None, last_result: String::new() })
    }
}

pub struct Scheduler {
    volume: Weak<Volume>,
    jobs: Mutex<Vec<Job>>,
    pub clock: Clock,
    file: Option<PathBuf>,
    backup: Mutex<Option<Arc<BackupFn>>>,
    /// Revision counter at the last backup a job took (new data check).
    last_backup_revision: Mutex<Option<u64>>,
    run_lock: Mutex<()>,
}

impl Scheduler {
    /// Loads the jobs file (if any) and, for the system clock, starts the timer thread.
    pub fn start(volume: &Arc<Volume>, file: Option<PathBuf>, clock: Clock) -> Result<Arc<Scheduler>, String> {
        let specs = match &file {
            Some(f) if f.exists() => {
                let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", f.display()))?;
                parse_jobs(&v).map_err(|e| format!("{}: {e}", f.display()))?
            }
            _ => Vec::new(),
        };
        let now = clock.now();
        let jobs = specs.into_iter().map(|s| Job::new(s, now)).collect::<Result<Vec<_>, _>>()?;
        let system = matches!(clock, Clock::System);
        let s = Arc::new(Scheduler {
            volume: Arc::downgrade(volume),
            jobs: Mutex::new(jobs),
            clock,
            file,
            backup: Mutex::new(None),
            last_backup_revision: Mutex::new(None),
            run_lock: Mutex::new(()),
        });
        if system {
            let w = Arc::downgrade(&s);
            std::thread::Builder::new()
                .name("recurring-jobs".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let Some(s) = w.upgrade() else { return };
                    s.run_due();
                })
                .map_err(|e| e.to_string())?;
        }
        Ok(s)
    }

    pub fn set_backup(&self, f: Arc<BackupFn>) {
        *self.backup.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    fn persist(&self, jobs: &[Job]) -> Result<(), String> {
        let Some(f) = &self.file else { return Ok(()) };
        let v = Value::Array(jobs.iter().map(|j| j.spec.to_json()).collect());
        let data = serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?;
        longhorn_replica::meta::write_atomic(f, &data).map_err(|e| e.to_string())
    }

    /// Adds (or replaces, by name) the jobs in `v`, a list in StorageClass form.
    pub fn add(&self, v: &Value) -> Result<Vec<String>, String> {
        let new = parse_jobs(v)?;
        let now = self.clock.now();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut next: Vec<Job> = Vec::new();
        for j in jobs.drain(..) {
            if !new.iter().any(|n| n.name == j.spec.name) {
                next.push(j);
            }
        }
        let names: Vec<String> = new.iter().map(|j| j.name.clone()).collect();
        for n in new {
            next.push(Job::new(n, now)?);
        }
        self.persist(&next)?;
        *jobs = next;
        Ok(names)
    }

    pub fn remove(&self, name: &str) -> Result<(), String> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let before = jobs.len();
        let rest: Vec<Job> = jobs.drain(..).filter(|j| j.spec.name != name).collect();
        let removed = rest.len() != before;
        self.persist(&rest)?;
        *jobs = rest;
        if removed { Ok(()) } else { Err(format!("no recurring job named {name:?}")) }
    }

    pub fn list(&self) -> Vec<JobStatus> {
        let fmt = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_default();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|j| JobStatus {
                name: j.spec.name.clone(),
                task: j.spec.task.as_str().into(),
                cron: j.spec.cron.clone(),
                retain: j.spec.retain,
                labels: j.spec.labels.clone(),
                next_run: fmt(j.next),
                last_run: fmt(j.last_run),
                last_result: j.last_result.clone(),
            })
            .collect()
    }

    /// Manual clock only: moves time forward and runs what became due.
    pub fn advance(&self, secs: i64) -> Result<DateTime<Utc>, String> {
        let Clock::Manual(t) = &self.clock else {
            return Err("the engine runs on the system clock (start it with --manual-clock to drive time)".into());
        };
        let now = {
            let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
            *g = advance_clock(*g, secs)?;
            *g
        };
        self.run_due();
        Ok(now)
    }

    /// Runs every job whose time has come, one after the other.
    pub fn run_due(&self) {
        let _run = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(vol) = self.volume.upgrade() else { return };
        let now = self.clock.now();
        let due: Vec<RecurringJob> = {
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let mut due = Vec::new();
            for j in jobs.iter_mut() {
                if j.next.is_some_and(|n| n <= now) {
                    due.push(j.spec.clone());
                    j.next = j.cron.find_next_occurrence(&now, false).ok();
                }
            }
            due
        };
        for spec in due {
            let r = self.run_one(&vol, &spec);
            let text = match &r {
                Ok(s) => s.clone(),
                Err(e) => format!("error: {e}"),
            };
            match &r {
                Ok(s) => info!(volume = vol.name(), job = %spec.name, "recurring job: {s}"),
                Err(e) => warn!(volume = vol.name(), job = %spec.name, "recurring job failed (retried at its next time): {e}"),
            }
            let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(j) = jobs.iter_mut().find(|j| j.spec.name == spec.name) {
                j.last_run = Some(now);
                j.last_result = text;
            }
        }
    }

    fn run_one(&self, vol: &Arc<Volume>, spec: &RecurringJob) -> Result<String, String> {
        let mut labels = spec.labels.clone();
        labels.insert(LABEL.to_string(), spec.name.clone());
        if spec.task.is_backup() {
            let rev = vol.revision()?;
            let last = *self.last_backup_revision.lock().unwrap_or_else(|e| e.into_inner());
            if !spec.task.forced() && last == Some(rev) {
                return Ok("skipped: no new data since the last backup".into());
            }
            let f = self.backup.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let f = f.ok_or("no backup target is configured for this engine")?;
            let name = f(vol, &spec.name, &labels, spec.retain)?;
            *self.last_backup_revision.lock().unwrap_or_else(|e| e.into_inner()) = Some(rev);
            return Ok(format!("backup {name} created"));
        }
        if !spec.task.forced() && !vol.head_has_data()? {
            return Ok("skipped: no new data since the last snapshot".into());
        }
        let name = format!("{}-c-{}", spec.name, &crate::snapshot::new_uuid()[..6]);
        vol.snapshot(Some(&name), Some(labels), true)?;
        let removed = self.retain_snapshots(vol, spec)?;
        Ok(if removed.is_empty() { format!("snapshot {name} created") } else { format!("snapshot {name} created; removed {}", removed.join(", ")) })
    }

    /// Removes this job's oldest snapshots beyond `retain`, never anyone else's.
    fn retain_snapshots(&self, vol: &Arc<Volume>, spec: &RecurringJob) -> Result<Vec<String>, String> {
        // The list is in chain order, oldest first: the truth even when creation times tie.
        let mine: Vec<_> = vol
            .snapshot_list()?
            .into_iter()
            .filter(|s| s.labels.get(LABEL) == Some(&spec.name) && s.in_chain)
            .collect();
        let live = mine.iter().filter(|s| !s.removed).count();
        let mut excess = live.saturating_sub(spec.retain as usize);
        let mut removed = Vec::new();
        for s in &mine {
            // Already-removed ones are retried once their merge is possible (their
            // child is no longer the head).
            if s.removed && s.children.iter().any(|c| c == "volume-head") {
                continue;
            }
            if s.removed || excess > 0 {
                if !s.removed {
                    excess -= 1;
                }
                vol.snapshot_remove(&s.name)?;
                removed.push(s.name.clone());
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: croner accepted these, and took 0.4 s to find no next run.
    #[test]
    fn cron_list_elements_must_not_be_empty() {
        for bad in ["*/5 1, , 2 *", "0 0 ,1 * *", "0 0 1,,2 * *"] {
            assert!(parse_cron(bad).expect_err(bad).contains("empty list element"), "{bad}");
        }
        assert!(parse_cron("0,30 1,2 * * 1-5").is_ok());
    }

    /// `job-clock` with a huge `advance` used to panic inside chrono (and, with
    /// panic=abort, take the engine down); now it is an error.
    #[test]
    fn clock_advance_out_of_range_is_an_error() {
        let t = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z").expect("time").with_timezone(&Utc);
        assert_eq!(advance_clock(t, 60).expect("one minute").to_rfc3339(), "2024-01-01T00:01:00+00:00");
        for secs in [i64::MAX, i64::MIN, i64::MAX / 1000, 400_000 * 365 * 86_400] {
            assert!(advance_clock(t, secs).is_err(), "{secs}");
        }
    }
}
