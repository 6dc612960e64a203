//! Recurring jobs (`recurringJobs` lists, cron strings) and volume specs, parsed as
//! `job add`, the engine's jobs file and `longhorn up --spec` parse them.

use chrono::{DateTime, Utc};
use longhorn_engine::jobs::{parse_cron, parse_jobs};
use serde_json::Value;

/// manager/src/spec.rs is compiled here by itself, as `longhorn up --spec` and the
/// manager use it (it only needs serde_json, anyhow and the engine; the manager crate
/// itself pulls in the HTTP stack).
#[path = "../../../manager/src/spec.rs"]
#[allow(dead_code)]
mod spec;

/// A fixed "now" (the fuzz runs must be deterministic): 2024-02-29, a leap day.
pub(crate) fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_709_164_800, 0).expect("a valid timestamp")
}

/// What the scheduler does with a cron expression that parsed: find the next run.
/// It must be after `now` and match the expression.
fn next_run(expr: &str) {
    let Ok(c) = parse_cron(expr) else { return };
    let now = now();
    if let Ok(next) = c.find_next_occurrence(&now, false) {
        assert!(next > now, "{expr:?}: next run {next} is not after {now}");
        assert!(c.is_time_matching(&next).unwrap_or(false), "{expr:?}: next run {next} does not match");
    }
}

/// A cron string, as a job's `cron` field.
pub fn cron(data: &[u8]) {
    if let Some(s) = crate::text(data) {
        next_run(s);
    }
}

/// Checks a list that `parse_jobs` accepted: the rules of the module doc hold, every
/// cron parses and schedules, and the list encodes (`to_json`, as the jobs file is
/// written) and parses back to the same list.
pub(crate) fn accepted_jobs(v: &Value) {
    let Ok(jobs) = parse_jobs(v) else { return };
    for (i, j) in jobs.iter().enumerate() {
        assert!(!j.name.is_empty() && j.name.len() <= 8, "name {:?}", j.name);
        assert!(j.name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
        assert!(jobs[..i].iter().all(|o| o.name != j.name), "duplicate name {:?}", j.name);
        assert!((1..=250).contains(&j.retain));
        next_run(&j.cron);
    }
    let enc = Value::Array(jobs.iter().map(|j| j.to_json()).collect());
    let back = parse_jobs(&enc).expect("what the jobs file holds parses");
    let again = Value::Array(back.iter().map(|j| j.to_json()).collect());
    assert_eq!(again, enc);
}

/// A `recurringJobs` list (JSON).
pub fn recurring_jobs(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        accepted_jobs(&v);
    }
}

/// A volume spec (`longhorn up --spec`).
pub fn volume_spec(data: &[u8]) {
    let Some(text) = crate::text(data) else { return };
    let Ok(s) = spec::parse(text) else { return };
    if let Some(n) = s.number_of_replicas {
        assert!((1..=32).contains(&n));
    }
    if let Some(j) = &s.recurring_jobs {
        assert!(parse_jobs(j).is_ok(), "a spec's jobs were checked");
        accepted_jobs(j);
    }
    if let Some(m) = &s.access_mode {
        assert!(["ReadWriteOnce", "ReadWriteMany", "rwo", "rwx"].contains(&m.as_str()));
    }
    let _ = s.to_json();
}
