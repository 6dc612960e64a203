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
            Err(e) => {
                let _ = self.delete_replicas(name);
                Err(e.status())
            }
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
        });
        if body["recurringJobs"].is_null() {
            body["recurringJobs"] = json!([]);
        }
        match to.call("POST", "/v1/volumes", Some(body)) {
            Ok(_) => {}
            // A retry after the create went through: the same replicas, so the same volume.
            Err(e) if e.status == 409 && to.volume(name).ok().flatten().is_some_and(|v| same_replicas(&v, &h)) => {}
            Err(e) => return Err(e.status()),
        }
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
