//! Volume specs in the form of a Longhorn StorageClass's parameters:
//!
//! ```json
//! {"numberOfReplicas": "3", "staleReplicaTimeout": "30", "fromBackup": "",
//!  "recurringJobs": "[{\"name\":\"snap\",\"task\":\"snapshot\",\"cron\":\"*/1 * * * *\",\"retain\":1}]"}
//! ```
//!
//! StorageClass parameters are strings, so numbers and the job list are accepted both
//! as strings and as plain JSON values. A spec is checked whole before anything of it
//! is used; errors name the parameter.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub number_of_replicas: Option<usize>,
    pub stale_replica_timeout: Option<u64>,
    pub from_backup: Option<String>,
    pub recurring_jobs: Option<Value>,
    pub access_mode: Option<String>,
    /// Longhorn's dataLocality: `disabled`, `best-effort` (a replica on the engine's
    /// host, served in the engine's process when the host keeps one) or `strict-local`
    /// (the one replica, there).
    pub data_locality: Option<String>,
}

fn number(v: &Value, field: &str) -> Result<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| anyhow!("{field}: must be a whole number, not {n}")),
        Value::String(s) => s.trim().parse().map_err(|_| anyhow!("{field}: must be a whole number, not {s:?}")),
        other => bail!("{field}: must be a number, not {other}"),
    }
}

pub fn parse(text: &str) -> Result<Spec> {
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow!("the volume spec is not JSON: {e}"))?;
    from_value(&v)
}

/// Checks a spec given as a JSON value (the manager's `POST /v1/volumes` passes the
/// StorageClass parameters of its body here, so both paths share one rule). Errors
/// start with the parameter's name.
pub fn from_value(v: &Value) -> Result<Spec> {
    let obj = v.as_object().ok_or_else(|| anyhow!("the volume spec must be a JSON object"))?;
    let mut s = Spec::default();
    for (k, v) in obj {
        match k.as_str() {
            "numberOfReplicas" => {
                let n = number(v, k)?;
                if !(1..=32).contains(&n) {
                    bail!("numberOfReplicas: must be between 1 and 32, not {n}");
                }
                s.number_of_replicas = Some(n as usize);
            }
            "staleReplicaTimeout" => s.stale_replica_timeout = Some(number(v, k)?),
            "fromBackup" => match v {
                Value::String(u) if u.is_empty() => {}
                Value::String(u) => s.from_backup = Some(u.clone()),
                _ => bail!("fromBackup: must be a backup URL string"),
            },
            "recurringJobs" => {
                let jobs = match v {
                    Value::String(t) => serde_json::from_str(t).map_err(|e| anyhow!("recurringJobs: not a JSON list: {e}"))?,
                    other => other.clone(),
                };
                longhorn_engine::jobs::parse_jobs(&jobs).map_err(|e| anyhow!("recurringJobs: {e}"))?;
                s.recurring_jobs = Some(jobs);
            }
            "accessMode" => match v.as_str() {
                Some(m @ ("ReadWriteOnce" | "ReadWriteMany" | "rwo" | "rwx")) => s.access_mode = Some(m.to_string()),
                _ => bail!("accessMode: must be ReadWriteOnce or ReadWriteMany, not {v}"),
            },
            "dataLocality" => match v.as_str() {
                Some(m @ ("disabled" | "best-effort" | "strict-local")) => s.data_locality = Some(m.to_string()),
                _ => bail!("dataLocality: must be disabled, best-effort or strict-local, not {v}"),
            },
            other => bail!("unknown volume spec parameter {other:?}"),
        }
    }
    Ok(s)
}

impl Spec {
    pub fn to_json(&self) -> Value {
        json!({
            "numberOfReplicas": self.number_of_replicas,
            "staleReplicaTimeout": self.stale_replica_timeout,
            "fromBackup": self.from_backup,
            "recurringJobs": self.recurring_jobs,
            "accessMode": self.access_mode,
            "dataLocality": self.data_locality,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn storage_class_strings_and_plain_values() {
        let s = parse(r#"{"numberOfReplicas":"2","staleReplicaTimeout":"30","fromBackup":"","recurringJobs":"[{\"name\":\"snap\",\"task\":\"snapshot\",\"cron\":\"*/1 * * * *\",\"retain\":1}]"}"#)
            .expect("parses");
        assert_eq!(s.number_of_replicas, Some(2));
        assert_eq!(s.stale_replica_timeout, Some(30));
        assert!(s.from_backup.is_none());
        let s = parse(r#"{"numberOfReplicas":3,"recurringJobs":[],"dataLocality":"best-effort"}"#).expect("parses");
        assert_eq!(s.number_of_replicas, Some(3));
        assert_eq!(s.data_locality.as_deref(), Some("best-effort"));
        for (bad, field) in [
            (r#"{"numberOfReplicas":"x"}"#, "numberOfReplicas"),
            (r#"{"numberOfReplicas":0}"#, "numberOfReplicas"),
            (r#"{"recurringJobs":"[{\"name\":\"x\",\"task\":\"clone\",\"cron\":\"* * * * *\",\"retain\":1}]"}"#, "task"),
            (r#"{"replicas":3}"#, "replicas"),
            (r#"{"dataLocality":"nearby"}"#, "dataLocality"),
        ] {
            let e = parse(bad).expect_err("rejected").to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }
}
