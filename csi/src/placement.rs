//! Volumes whose replicas live on several hosts. With more than one host's manager, the
//! controller puts each of a new volume's replicas on a host of its own (Longhorn's
//! replica anti-affinity), kept there by that host's manager (`POST /v1/replicas`),
//! and records the volume with the manager of the first host; when a node elsewhere
//! publishes it, the record (the spec, the replicas' addresses, the secret) moves to
//! that node's manager, whose engine then serves it. No data moves: every replica is
//! reached over the network by whichever engine serves the volume.
//!
//! Invariants:
//! - A volume is recorded by one manager at a time; the record moves only while the
//!   volume is detached (a second engine on its replicas is also refused by them).
//! - The volume's secret is made here, once, and given only to the managers that keep
//!   one of its replicas or its record.
//! - Replicas of a volume no manager records are leftovers of a create that did not
//!   finish: the next create (or delete) of that name removes them.

use crate::manager::Manager;
use crate::Driver;
use serde_json::{json, Value};
use std::io::Read;
use tonic::Status;

/// A new volume's secret: 32 random bytes as 64 hex digits (the replicas' key file).
fn new_secret() -> Result<String, Status> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Status::internal(format!("random bytes for the volume's secret: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Driver {
    /// Removes every replica of `volume` the managers keep (a delete, or the leftovers
    /// of an unfinished create). A host that does not answer makes it UNAVAILABLE, so
    /// the caller's retry finishes it.
    pub(crate) fn delete_replicas(&self, volume: &str) -> Result<(), Status> {
        let mut down = None;
        for m in &self.managers {
            let list = match m.call("GET", "/v1/replicas", None) {
                Ok(v) => v["data"].as_array().cloned().unwrap_or_default(),
                Err(e) => {
                    down = Some(e.status());
                    continue;
                }
            };
            for r in list.iter().filter(|r| r["volume"] == volume) {
                let name = r["name"].as_str().unwrap_or("");
                match m.call("DELETE", &format!("/v1/replicas/{volume}/{name}"), None) {
                    Ok(_) => tracing::info!(volume, host = m.host, replica = name, "deleted replica"),
                    Err(e) if e.status == 404 => {}
                    Err(e) => return Err(e.status()),
                }
            }
        }
        match down {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    /// Grows every replica of `volume` the hosts keep to `size` (the volume detached);
    /// a host that does not answer makes it UNAVAILABLE, for a retry.
    pub(crate) fn expand_replicas(&self, volume: &str, size: u64) -> Result<(), Status> {
        for m in &self.managers {
            let list = m.call("GET", "/v1/replicas", None).map_err(|e| e.status())?;
            for r in list["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == volume) {
                let name = r["name"].as_str().unwrap_or("");
                m.call("POST", &format!("/v1/replicas/{volume}/{name}?action=expand"), Some(json!({"size": size.to_string()})))
                    .map_err(|e| e.status())?;
                tracing::info!(volume, host = m.host, replica = name, size, "expanded replica");
            }
        }
        Ok(())
    }

    /// Makes `n` replicas of a new volume on distinct hosts of `hosts` (best first)
    /// and records the volume with the first host's manager; `body` is the volume's
    /// create body. Fewer hosts than replicas is refused unless soft anti-affinity lets
    /// replicas share a host.
    pub(crate) fn create_spread<'a>(&self, hosts: &[&'a Manager], mut body: Value, name: &str, size: u64, n: usize) -> Result<(&'a Manager, Value), Status> {
        if hosts.len() < n && !self.soft_anti_affinity {
            return Err(Status::resource_exhausted(format!(
                "numberOfReplicas {n} needs {n} hosts, one replica each; {} can take it (replica-soft-anti-affinity is off)",
                hosts.len()
            )));
        }
        self.delete_replicas(name)?;
        let secret = new_secret()?;
        let mut addrs = Vec::new();
        for i in 0..n {
            let m = hosts[i % hosts.len()];
            let made = m.call("POST", "/v1/replicas", Some(json!({"volume": name, "name": format!("r{i}"), "size": size.to_string(), "secret": secret})));
            match made.and_then(|r| {
                r["address"].as_str().map(str::to_string).ok_or(crate::manager::ApiError { status: 500, message: "a replica without an address".into() })
            }) {
                // A replica other hosts' engines cannot reach would leave the volume
                // with fewer real copies than it says (a manager without --replica-address).
                Ok(a) if a.parse::<std::net::SocketAddr>().map(|sa| sa.ip().is_loopback()).unwrap_or(true) => {
                    let _ = self.delete_replicas(name);
                    return Err(Status::failed_precondition(format!(
                        "host {:?} keeps replicas at {a}, which other hosts cannot reach: start its manager with --replica-address",
                        m.host
                    )));
                }
                Ok(a) => {
                    tracing::info!(volume = name, host = m.host, address = a, "made replica");
                    addrs.push(a);
                }
                Err(e) => {
                    // What was made goes again: nothing records it.
                    let _ = self.delete_replicas(name);
                    return Err(e.status());
                }
            }
        }
        body["replicaAddresses"] = json!(addrs);
        body["secret"] = json!(secret);
        body["numberOfReplicas"] = json!(n);
        let owner = hosts[0];
        match owner.call("POST", "/v1/volumes", Some(body)) {
            Ok(v) => Ok((owner, v)),
            // Refused: nothing records the replicas, so they go.
            Err(e) if (400..500).contains(&e.status) => {
                let _ = self.delete_replicas(name);
                Err(e.status())
            }
            // No answer, or the host failed: the volume may be recorded. The retry's
            // lookup decides; until then the replicas stay.
            Err(e) => Err(Status::unavailable(e.message)),
        }
    }

    /// Moves a detached volume's record from `from` to `to` (ControllerPublish on a
    /// node that does not record it). Retried after a failure half-way, it finishes.
    pub(crate) fn move_volume(&self, name: &str, from: &Manager, to: &Manager) -> Result<Value, Status> {
        let h = from.action(name, "handOff", json!({})).map_err(|e| e.status())?;
        let mut body = json!({
            "name": name, "size": h["size"], "numberOfReplicas": h["numberOfReplicas"],
            "staleReplicaTimeout": h["staleReplicaTimeout"], "accessMode": h["accessMode"],
            "recurringJobs": h["recurringJobs"], "replicaAddresses": h["replicaAddresses"], "secret": h["secret"],
            "healthyReplicas": h["healthyReplicas"],
            // The new record is the volume from now on (see `failover`).
            "generation": h["generation"].as_u64().unwrap_or(0) + 1,
        });
        if body["recurringJobs"].is_null() {
            body["recurringJobs"] = json!([]);
        }
        match to.call("POST", "/v1/volumes", Some(body)) {
            Ok(_) => {}
            // A retry after the create went through: the same replicas, so the same
            // volume (handed off from there earlier, perhaps: taken back).
            Err(e) if e.status == 409 && to.volume(name).ok().flatten().is_some_and(|v| same_replicas(&v, &h)) => {
                to.action(name, "handOff", json!({"undo": true})).map_err(|e| e.status())?;
            }
            Err(e) => return Err(e.status()),
        }
        // The old record goes; until it has, it is `handedOff` and cannot be attached.
        from.call("DELETE", &format!("/v1/volumes/{name}"), None).map_err(|e| e.status())?;
        tracing::info!(volume = name, from = from.host, to = to.host, "moved the volume's engine");
        to.volume(name).map_err(|e| e.status())?.ok_or_else(|| Status::internal(format!("volume {name:?} is gone from host {:?}", to.host)))
    }
}

/// Whether a volume as a manager shows it has the replicas a hand-off named.
fn same_replicas(v: &Value, h: &Value) -> bool {
    let mut have: Vec<&str> = v["replicas"].as_array().into_iter().flatten().filter_map(|r| r["address"].as_str()).filter(|a| !a.is_empty()).collect();
    let mut want: Vec<&str> = h["replicaAddresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    have.sort();
    want.sort();
    have == want
}

/// How often the controller looks for replicas lost with their host.
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The controller's loop: replicas lost with their host are rebuilt on another host
/// once the volume's staleReplicaTimeout has passed (Longhorn's rule), and replicas
/// no volume uses any more are deleted. Runs until the process ends.
pub fn reconcile_forever(d: std::sync::Arc<Driver>) {
    let mut failed: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        std::thread::sleep(RECONCILE_EVERY);
        d.reconcile(&mut failed);
    }
}

use std::collections::HashMap;
use std::time::Instant;

impl Driver {
    fn reconcile(&self, failed: &mut HashMap<(String, String), Instant>) {
        let mut still = std::collections::HashSet::new();
        let mut seen: HashMap<String, Vec<(&Manager, Value)>> = HashMap::new();
        for owner in &self.managers {
            match owner.volumes() {
                Ok(vols) => {
                    self.note_reachable(owner, true);
                    for v in vols.into_iter().filter(|v| v["state"] != "handedOff") {
                        if let Some(n) = v["name"].as_str() {
                            seen.entry(n.to_string()).or_default().push((owner, v));
                        }
                    }
                }
                Err(_) => self.note_reachable(owner, false),
            }
        }
        let lists: Vec<(&Manager, Vec<Value>)> = self
            .managers
            .iter()
            .filter_map(|m| m.call("GET", "/v1/replicas", None).ok().map(|l| (m, l["data"].as_array().cloned().unwrap_or_default())))
            .collect();
        // A lost host back with the record of a volume served elsewhere since: gone
        // first, so nothing below acts on it.
        for (owner, v) in self.settle_records(seen) {
            {
                let Some(name) = v["name"].as_str() else { continue };
                let remote: Vec<String> = v["replicaAddresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect();
                if remote.is_empty() {
                    continue;
                }
                self.keep_record_copies(owner, &v, &lists);
                if v["state"] != "attached" {
                    continue;
                }
                // A replica is lost while the engine does not have it healthy (ERR, or
                // out of its list while its host does not answer).
                let healthy: Vec<&str> = v["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| r["mode"] == "RW" || r["mode"] == "WO")
                    .filter_map(|r| r["address"].as_str())
                    .collect();
                let stale_after = std::time::Duration::from_secs(v["staleReplicaTimeout"].as_u64().unwrap_or(2880).max(1) * 60);
                for addr in &remote {
                    if healthy.contains(&addr.as_str()) {
                        continue;
                    }
                    let key = (name.to_string(), addr.clone());
                    still.insert(key.clone());
                    let since = *failed.entry(key.clone()).or_insert_with(|| {
                        tracing::warn!(volume = name, replica = addr, "replica failed; rebuilt elsewhere if it is not back within {stale_after:?}");
                        Instant::now()
                    });
                    if since.elapsed() < stale_after {
                        continue;
                    }
                    let Ok(_busy) = self.hold(name) else { continue };
                    match self.replace_replica(owner, name, addr, &remote) {
                        Ok(new) => {
                            tracing::info!(volume = name, old = addr, new, "rebuilding a lost replica on another host");
                            failed.remove(&key);
                        }
                        Err(e) => tracing::warn!(volume = name, replica = addr, "cannot rebuild the lost replica elsewhere yet: {}", e.message()),
                    }
                }
                self.delete_unused_replicas(name, &remote);
            }
        }
        failed.retain(|k, _| still.contains(k));
    }

    /// Makes a replica of `name` on a host that keeps none of its replicas (and answers),
    /// and has the volume's engine take it in place of `old`; the new address.
    fn replace_replica(&self, owner: &Manager, name: &str, old: &str, remote: &[String]) -> Result<String, Status> {
        let mut taken: Vec<&str> = Vec::new();
        let mut candidates: Vec<(u64, &Manager)> = Vec::new();
        for m in &self.managers {
            let Ok(list) = m.call("GET", "/v1/replicas", None) else { continue };
            let mine: Vec<Value> = list["data"].as_array().cloned().unwrap_or_default().into_iter().filter(|r| r["volume"] == name).collect();
            if mine.iter().any(|r| r["address"].as_str().is_some_and(|a| remote.iter().any(|x| x == a))) {
                taken.push(&m.host);
                continue;
            }
            let free = m.node().ok().and_then(|n| n["storageAvailable"].as_u64()).unwrap_or(0);
            candidates.push((free, m));
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0));
        let Some((_, to)) = candidates.first() else {
            return Err(Status::resource_exhausted(format!("no host without a replica of {name:?} answers (hosts with one: {taken:?})")));
        };
        let secret = owner.action(name, "replicaSecret", json!({})).map_err(|e| e.status())?;
        let size = owner.volume(name).map_err(|e| e.status())?.map(|v| crate::controller::vol_size(&v)).unwrap_or(0);
        // A name no replica of the volume has had: the old one's host may come back.
        let rname = format!("r{}", chrono::Utc::now().timestamp_millis());
        let made = to
            .call("POST", "/v1/replicas", Some(json!({"volume": name, "name": rname, "size": size.to_string(), "secret": secret["secret"]})))
            .map_err(|e| e.status())?;
        let new = made["address"].as_str().ok_or_else(|| Status::internal("a replica without an address"))?.to_string();
        if let Err(e) = owner.action(name, "replicaReplace", json!({"address": old, "newAddress": new})) {
            let _ = to.call("DELETE", &format!("/v1/replicas/{name}/{rname}"), None);
            return Err(e.status());
        }
        Ok(new)
    }

    /// Replicas of `name` the volume no longer lists (one replaced while its host was
    /// away): deleted once their host answers.
    fn delete_unused_replicas(&self, name: &str, remote: &[String]) {
        for m in &self.managers {
            let Ok(list) = m.call("GET", "/v1/replicas", None) else { continue };
            for r in list["data"].as_array().into_iter().flatten().filter(|r| r["volume"] == name) {
                let (Some(addr), Some(rn)) = (r["address"].as_str(), r["name"].as_str()) else { continue };
                if remote.iter().any(|a| a == addr) {
                    continue;
                }
                match m.call("DELETE", &format!("/v1/replicas/{name}/{rn}"), None) {
                    Ok(_) => tracing::info!(volume = name, host = m.host, replica = rn, "deleted a replica the volume no longer uses"),
                    Err(e) => tracing::warn!(volume = name, host = m.host, replica = rn, "deleting an unused replica: {}", e.message),
                }
            }
        }
    }
}
