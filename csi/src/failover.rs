//! A lost engine host. A volume whose replicas live on other hosts is recorded by the
//! manager of the host serving it (its owner); if that host is lost, so is the record,
//! and with it the volume, though its replicas live on. So the controller keeps a copy
//! of each such record with every replica of the volume (the replica's host keeps it,
//! `POST /v1/replicas/{volume}/{name}?action=record`), refreshed every reconcile round,
//! and when a node publishes a volume no reachable manager records, whose owner has not
//! answered for `failover_after`, the node's manager takes the volume over from the
//! newest copy.
//!
//! Invariants:
//! - A take-over never makes a second engine write to the replicas: the replicas'
//!   engine lease refuses the new engine while the old one is alive and reaches them
//!   (the attach then fails and is retried), and fences the old one once the new one
//!   holds them.
//! - The new record's generation is one above the copy's. When the lost host's manager
//!   answers again with its old record, the lower generation is removed (its engine
//!   stopped first); nothing of the replicas is touched.
//! - The copy carries the owner's healthyReplicas (at most a reconcile round old): the
//!   new host's manager starts the engine only if one of them answers, so a take-over
//!   never starts on replicas the lost engine had already dropped.
//! - A ReadWriteMany volume is taken over too, but nodes that mounted its share from the
//!   lost host keep a dead mount until they publish again.

use crate::manager::Manager;
use crate::Driver;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Status;

/// A copy of a volume's record as a replica's host keeps it.
struct Copy<'a> {
    holder: &'a Manager,
    replica: String,
    record: Value,
}

impl Driver {
    /// Records whether `m` answered (for how long it has not).
    pub(crate) fn note_reachable(&self, m: &Manager, ok: bool) {
        let Ok(mut d) = self.down_since.lock() else { return };
        if ok {
            if d.remove(&m.host).is_some() {
                tracing::info!(host = m.host, "the host's manager answers again");
            }
        } else {
            d.entry(m.host.clone()).or_insert_with(|| {
                tracing::warn!(host = m.host, "the host's manager does not answer");
                Instant::now()
            });
        }
    }

    /// How long `host`'s manager has not answered (`None`: it answered last time).
    fn lost_for(&self, host: &str) -> Option<Duration> {
        self.down_since.lock().ok()?.get(host).map(Instant::elapsed)
    }

    /// What the replicas of a volume recorded by `owner` keep of it.
    fn record_of(owner: &Manager, v: &Value) -> Value {
        json!({
            "owner": owner.host, "generation": v["generation"].as_u64().unwrap_or(0), "size": v["size"],
            "numberOfReplicas": v["numberOfReplicas"], "staleReplicaTimeout": v["staleReplicaTimeout"],
            "accessMode": v["accessMode"], "recurringJobs": v["recurringJobs"],
            "replicaAddresses": v["replicaAddresses"], "healthyReplicas": v["healthyReplicas"],
        })
    }

    /// Gives every replica of `v` (recorded by `owner`) the current copy of its record,
    /// where it does not hold it already. `lists`: each answering manager's replicas.
    pub(crate) fn keep_record_copies(&self, owner: &Manager, v: &Value, lists: &[(&Manager, Vec<Value>)]) {
        let Some(name) = v["name"].as_str() else { return };
        let want = Self::record_of(owner, v);
        for (m, list) in lists {
            for r in list.iter().filter(|r| r["volume"] == name && r["record"] != want) {
                let Some(rn) = r["name"].as_str() else { continue };
                if let Err(e) = m.call("POST", &format!("/v1/replicas/{name}/{rn}?action=record"), Some(json!({"record": want}))) {
                    tracing::warn!(volume = name, host = m.host, replica = rn, "keeping the volume's record with its replica: {}", e.message);
                }
            }
        }
    }

    /// The newest copy of `name`'s record among the answering hosts.
    fn newest_copy(&self, name: &str) -> Option<Copy<'_>> {
        let mut best: Option<Copy> = None;
        for m in &self.managers {
            let Ok(list) = m.call("GET", "/v1/replicas", None) else { continue };
            for r in list["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == name && r["record"].is_object()) {
                let g = r["record"]["generation"].as_u64().unwrap_or(0);
                if best.as_ref().is_none_or(|b| g > b.record["generation"].as_u64().unwrap_or(0)) {
                    best = Some(Copy { holder: m, replica: r["name"].as_str().unwrap_or("").to_string(), record: r["record"].clone() });
                }
            }
        }
        best
    }

    /// The host that recorded `name` if it has been lost for at least `failover_after`
    /// (as the newest copy of its record names it).
    pub(crate) fn lost_owner(&self, name: &str) -> Option<String> {
        let c = self.newest_copy(name)?;
        let owner = c.record["owner"].as_str()?.to_string();
        self.lost_for(&owner).filter(|d| *d >= self.failover_after).map(|_| owner)
    }

    /// Serves `name`, which no answering manager records, from `to`: its manager
    /// records the volume from the newest copy of its record, one generation up, if the
    /// owner that copy names has been lost for long enough. `Ok(None)`: no copy to take
    /// over from (the caller's own error stands).
    pub(crate) fn take_over<'a>(&self, name: &str, to: &'a Manager) -> Result<Option<Value>, Status> {
        let Some(c) = self.newest_copy(name) else { return Ok(None) };
        let owner = c.record["owner"].as_str().unwrap_or("");
        match self.lost_for(owner) {
            None => return Ok(None),
            Some(d) if d < self.failover_after => {
                return Err(Status::unavailable(format!(
                    "volume {name:?}: its host {owner:?} has not answered for {} s; it is served elsewhere after {} s",
                    d.as_secs(),
                    self.failover_after.as_secs()
                )))
            }
            Some(_) => {}
        }
        let secret = c
            .holder
            .call("POST", &format!("/v1/replicas/{name}/{}?action=secret", c.replica), Some(json!({})))
            .map_err(|e| e.status())?;
        let gen = c.record["generation"].as_u64().unwrap_or(0) + 1;
        let r = &c.record;
        let body = json!({
            "name": name, "size": r["size"], "numberOfReplicas": r["numberOfReplicas"], "staleReplicaTimeout": r["staleReplicaTimeout"],
            "accessMode": r["accessMode"], "recurringJobs": r["recurringJobs"], "replicaAddresses": r["replicaAddresses"],
            "healthyReplicas": r["healthyReplicas"], "secret": secret["secret"], "generation": gen,
        });
        match to.call("POST", "/v1/volumes", Some(body)) {
            Ok(_) => {}
            // A retry after the create went through.
            Err(e) if e.status == 409 && to.volume(name).ok().flatten().is_some_and(|v| v["generation"].as_u64() == Some(gen)) => {}
            Err(e) => return Err(e.status()),
        }
        tracing::warn!(volume = name, lost = owner, to = to.host, generation = gen, "took over the volume of a lost host from its record copy");
        to.volume(name).map_err(|e| e.status())
    }

    /// Of the records of one volume on several managers (a lost host's, back), keeps
    /// the highest generation and removes the others. Returns the records to act on:
    /// one per volume, none of a volume whose records tie.
    pub(crate) fn settle_records<'a>(&self, seen: HashMap<String, Vec<(&'a Manager, Value)>>) -> Vec<(&'a Manager, Value)> {
        let mut out = Vec::new();
        for (name, mut recs) in seen {
            if recs.len() == 1 {
                out.extend(recs);
                continue;
            }
            recs.sort_by_key(|(_, v)| std::cmp::Reverse(v["generation"].as_u64().unwrap_or(0)));
            let top = recs[0].1["generation"].as_u64().unwrap_or(0);
            if recs[1].1["generation"].as_u64().unwrap_or(0) == top {
                tracing::warn!(volume = name, "recorded by several hosts at the same generation; left alone");
                continue;
            }
            let addrs = |v: &Value| -> Vec<String> { v["replicaAddresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect() };
            let winner = addrs(&recs[0].1);
            for (m, v) in &recs[1..] {
                // Only a record of the same volume goes: all its replicas on other hosts
                // (removing it deletes no data) and some of them the winner's. A volume
                // of that name made on a host by hand is not this one.
                let mine = addrs(v);
                let spread = !mine.is_empty() && mine.len() as u64 == v["numberOfReplicas"].as_u64().unwrap_or(0);
                if !spread || !mine.iter().any(|a| winner.contains(a)) {
                    tracing::warn!(volume = name, host = m.host, "another volume of this name, not one of its records; left alone");
                    continue;
                }
                tracing::warn!(volume = name, host = m.host, generation = v["generation"].as_u64().unwrap_or(0), top, "removing the record of a volume served elsewhere since (its host was lost)");
                match m.call("DELETE", &format!("/v1/volumes/{name}"), None) {
                    Ok(_) => tracing::info!(volume = name, host = m.host, "removed the old record"),
                    Err(e) => tracing::warn!(volume = name, host = m.host, "removing the old record: {}", e.message),
                }
            }
            out.push(recs.swap_remove(0));
        }
        out
    }
}
