//! The controller service: volumes and snapshots through the managers' APIs, placed by
//! topology and free space.

use crate::ids::{self, SnapId};
use crate::manager::Manager;
use crate::{blocking, csi, Driver, TOPOLOGY_KEY};
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::AccessType;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

pub struct Controller(pub Arc<Driver>);

/// What one volume capability asks for, once checked.
pub struct Cap {
    pub mode: Mode,
    pub block: bool,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
}

impl Cap {
    pub fn multi_node(&self) -> bool {
        self.mode == Mode::MultiNodeMultiWriter
    }
    pub fn read_only(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }
}

/// A capability this driver serves, or INVALID_ARGUMENT naming what it does not: one
/// node writing (or reading); many nodes writing only through the NFS share of a
/// filesystem (Longhorn's RWX), so never as a raw block device.
pub fn check_cap(c: &csi::VolumeCapability) -> Result<Cap, Status> {
    let mode = c.access_mode.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability.access_mode: missing"))?;
    let mode = Mode::try_from(mode.mode).map_err(|_| Status::invalid_argument(format!("volume_capability.access_mode: unknown mode {}", mode.mode)))?;
    let (block, fs_type, mount_flags) = match &c.access_type {
        Some(AccessType::Block(_)) => (true, String::new(), Vec::new()),
        Some(AccessType::Mount(m)) => (false, ids::fs_type(&m.fs_type)?.to_string(), m.mount_flags.clone()),
        None => return Err(Status::invalid_argument("volume_capability.access_type: missing (block or mount)")),
    };
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {}
        // As Longhorn: one host runs the engine and the volume's NFS share (`longhorn
        // share`), and every node that publishes it mounts the share.
        Mode::MultiNodeMultiWriter if !block => {}
        Mode::MultiNodeMultiWriter => {
            return Err(Status::invalid_argument(
                "volume_capability: MULTI_NODE_MULTI_WRITER is served as a shared filesystem (NFSv4), not as a raw block device",
            ))
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "volume_capability.access_mode: {} is not supported (SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, MULTI_NODE_MULTI_WRITER)",
                other.as_str_name()
            )))
        }
    }
    for f in &mount_flags {
        // Flags go to mount(8) joined by commas: one flag must stay one flag.
        if f.is_empty() || f.contains([',', '\0', '\n']) {
            return Err(Status::invalid_argument(format!("volume_capability.mount.mount_flags: {f:?} is not one mount option")));
        }
    }
    Ok(Cap { mode, block, fs_type, mount_flags })
}

fn caps(list: &[csi::VolumeCapability]) -> Result<Vec<Cap>, Status> {
    if list.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities: missing"));
    }
    list.iter().map(check_cap).collect()
}

fn need(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{field}: missing")));
    }
    Ok(())
}

pub fn vol_size(v: &Value) -> u64 {
    match &v["size"] {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn topology(host: &str) -> csi::Topology {
    csi::Topology { segments: HashMap::from([(TOPOLOGY_KEY.to_string(), host.to_string())]) }
}

/// `hosts`: where the volume can be published: its host, or every host for a volume
/// whose replicas are all reached over the network (its engine follows the node).
fn csi_volume(m: &Manager, hosts: &[String], v: &Value, content: Option<csi::VolumeContentSource>, fs: Option<&str>) -> csi::Volume {
    let mut ctx = HashMap::new();
    ctx.insert("host".to_string(), m.host.clone());
    if let Some(fs) = fs {
        ctx.insert("fsType".to_string(), fs.to_string());
    }
    csi::Volume {
        capacity_bytes: vol_size(v) as i64,
        volume_id: v["name"].as_str().unwrap_or("").to_string(),
        volume_context: ctx,
        content_source: content,
        accessible_topology: if spread(v) { hosts.iter().map(|h| topology(h)).collect() } else { vec![topology(&m.host)] },
    }
}

/// Whether a volume's replicas all live as replicas for other hosts (so any host can
/// serve it).
fn spread(v: &Value) -> bool {
    v["replicaAddresses"].as_array().is_some_and(|a| !a.is_empty() && a.len() as u64 == v["numberOfReplicas"].as_u64().unwrap_or(0))
}

fn timestamp(s: &str) -> Option<prost_types::Timestamp> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}

/// Paging of a list: the token is the index of the next entry.
fn page<T>(all: Vec<T>, max: i32, token: &str) -> Result<(Vec<T>, String), Status> {
    if max < 0 {
        return Err(Status::invalid_argument("max_entries: must not be negative"));
    }
    let start: usize = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| Status::aborted(format!("starting_token {token:?} is not one this driver gave")))?
    };
    if start > all.len() {
        return Err(Status::aborted(format!("starting_token {token:?} is past the end of the list")));
    }
    let n = if max == 0 { all.len() - start } else { (max as usize).min(all.len() - start) };
    let next = if start + n < all.len() { (start + n).to_string() } else { String::new() };
    Ok((all.into_iter().skip(start).take(n).collect(), next))
}

impl Driver {
    fn hosts(&self) -> Vec<String> {
        self.managers.iter().map(|m| m.host.clone()).collect()
    }

    /// The hosts a new volume may go to, best first: those the topology requirement
    /// prefers, then the rest it allows, each group by free space.
    fn placement(&self, req: Option<&csi::TopologyRequirement>) -> Result<Vec<&Manager>, Status> {
        let host_of = |t: &csi::Topology| t.segments.get(TOPOLOGY_KEY).cloned();
        let mut allowed: Vec<&Manager> = self.managers.iter().collect();
        let mut preferred: Vec<String> = Vec::new();
        if let Some(r) = req {
            if !r.requisite.is_empty() {
                let hosts: Vec<String> = r.requisite.iter().filter_map(host_of).collect();
                allowed.retain(|m| hosts.contains(&m.host));
            }
            preferred = r.preferred.iter().filter_map(host_of).collect();
        }
        if allowed.is_empty() {
            return Err(Status::resource_exhausted("accessibility_requirements: no host of this driver is in the requisite topology"));
        }
        // A host that does not answer takes no new volume or replica.
        let mut scored: Vec<(usize, u64, &Manager)> = allowed
            .into_iter()
            .filter_map(|m| {
                let free = m.node().ok()?["storageAvailable"].as_u64().unwrap_or(0);
                Some((preferred.iter().position(|h| *h == m.host).unwrap_or(usize::MAX), free, m))
            })
            .collect();
        if scored.is_empty() {
            return Err(Status::unavailable("no host the volume may go to answers"));
        }
        scored.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        Ok(scored.into_iter().map(|s| s.2).collect())
    }

    /// Waits for a volume's state; the attach and detach actions answer once the
    /// engine answers, but the block device shows a moment later.
    pub fn wait_state(&self, m: &Manager, name: &str, want: &str, timeout: Duration) -> Result<Value, Status> {
        let t = Instant::now();
        loop {
            let v = m.volume(name).map_err(|e| e.status())?.ok_or_else(|| Status::not_found(format!("volume {name:?} is gone")))?;
            let state = v["state"].as_str().unwrap_or("");
            if state == want {
                return Ok(v);
            }
            if state == "error" {
                return Err(Status::internal(format!("volume {name:?}: {}", v["message"].as_str().unwrap_or("error"))));
            }
            if t.elapsed() > timeout {
                return Err(Status::deadline_exceeded(format!("volume {name:?} is {state}, not {want}, after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn attach(&self, m: &Manager, name: &str, disable_frontend: bool) -> Result<Value, Status> {
        // Both fields every time: the manager keeps what the last attach asked for, and
        // a snapshot's attach of a detached volume asked for no block device.
        let body = if disable_frontend {
            json!({"disableFrontend": true})
        } else {
            json!({"disableFrontend": false, "frontend": self.frontend.as_deref().unwrap_or("blockdev")})
        };
        m.action(name, "attach", body).map_err(|e| e.status())?;
        self.wait_state(m, name, "attached", Duration::from_secs(150))
    }

    /// Runs `f` with the volume attached: a snapshot of a volume no pod uses is taken
    /// with the volume attached for the call only (its NBD export, no block device).
    fn with_attached<T>(&self, m: &Manager, v: &Value, f: impl FnOnce() -> Result<T, Status>) -> Result<T, Status> {
        let name = v["name"].as_str().unwrap_or("");
        match v["state"].as_str().unwrap_or("") {
            "attached" => f(),
            "detached" => {
                self.attach(m, name, true)?;
                let r = f();
                // Detached again before the answer, so a publish that follows finds it
                // detached and attaches it with its block device.
                match m.action(name, "detach", json!({})) {
                    Ok(_) => {
                        self.wait_state(m, name, "detached", Duration::from_secs(150))?;
                    }
                    Err(e) => tracing::warn!(volume = name, "detaching after the call: {}", e.message),
                }
                r
            }
            other => Err(Status::unavailable(format!("volume {name:?} is {other}; try again"))),
        }
    }

    fn create_volume(&self, r: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse, Status> {
        let name = ids::volume_name(&r.name)?;
        let caps = caps(&r.volume_capabilities)?;
        let range = r.capacity_range.unwrap_or_default();
        let size = ids::size(range.required_bytes, range.limit_bytes)?;
        let params = ids::volume_params(&r.parameters)?;
        let rwx = caps.iter().any(Cap::multi_node);
        let mut body = json!({"name": name, "size": size.to_string(), "accessMode": if rwx { "rwx" } else { "rwo" }});
        for (k, v) in &params.spec {
            body[k] = v.clone();
        }
        if let Some(src) = &r.volume_content_source {
            match &src.r#type {
                Some(csi::volume_content_source::Type::Snapshot(s)) => {
                    let id = SnapId::parse(&s.snapshot_id)
                        .ok_or_else(|| Status::not_found(format!("volume_content_source.snapshot: {:?} is not a snapshot of this driver", s.snapshot_id)))?;
                    match id {
                        SnapId::Backup { volume, backup } => {
                            let url = self.backup_url(&volume, &backup)?;
                            body["fromBackup"] = json!(url);
                        }
                        SnapId::Snap { .. } => {
                            return Err(Status::invalid_argument(
                                "volume_content_source.snapshot: a new volume is made from a backup (a VolumeSnapshotClass with type: bak); cloning a snapshot of a volume's own chain (snap://) is not built",
                            ))
                        }
                    }
                }
                Some(csi::volume_content_source::Type::Volume(_)) => {
                    return Err(Status::invalid_argument("volume_content_source.volume: cloning a volume is not supported"))
                }
                None => return Err(Status::invalid_argument("volume_content_source: names neither a snapshot nor a volume")),
            }
        }
        let _busy = self.hold(&name)?;
        if let Some((m, v)) = self.find(&name)? {
            // The same request again answers the volume the first one made.
            if vol_size(&v) != size {
                return Err(Status::already_exists(format!("volume {name:?} exists with {} bytes, not {size}", vol_size(&v))));
            }
            if (v["accessMode"] == "rwx") != rwx {
                return Err(Status::already_exists(format!("volume {name:?} exists with access mode {}", v["accessMode"])));
            }
            if let Some(u) = body.get("fromBackup").and_then(Value::as_str) {
                if v["fromBackup"].as_str() != Some(u) {
                    return Err(Status::already_exists(format!("volume {name:?} exists and was not restored from {u}")));
                }
            }
            return Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(m, &self.hosts(), &v, r.volume_content_source, params.fs_type)) });
        }
        let hosts = self.placement(r.accessibility_requirements.as_ref())?;
        // One host: its replicas are that host's own. Several: a replica per host, and
        // the engine wherever the volume is published. A restore is written to the
        // replicas of the host that restores it, so it stays there.
        let (m, v) = if self.managers.len() > 1 && body.get("fromBackup").is_none() {
            let n = match &body["numberOfReplicas"] {
                Value::String(s) => s.parse::<usize>().map_err(|_| Status::invalid_argument(format!("numberOfReplicas: {s:?} is not a number")))?,
                Value::Null => 3,
                other => return Err(Status::invalid_argument(format!("numberOfReplicas: {other} is not a number"))),
            };
            if !(1..=32).contains(&n) {
                return Err(Status::invalid_argument(format!("numberOfReplicas: must be between 1 and 32, not {n}")));
            }
            self.create_spread(&hosts, body, &name, size, n)?
        } else {
            let m = hosts[0];
            (m, m.call("POST", "/v1/volumes", Some(body)).map_err(|e| e.status())?)
        };
        tracing::info!(volume = name, host = m.host, size, "created volume");
        Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(m, &self.hosts(), &v, r.volume_content_source, params.fs_type)) })
    }

    fn delete_volume(&self, r: csi::DeleteVolumeRequest) -> Result<csi::DeleteVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        if !ids::valid_name(&r.volume_id) {
            // No volume has such a name: it is deleted already.
            return Ok(csi::DeleteVolumeResponse {});
        }
        let _busy = self.hold(&r.volume_id)?;
        // Every record of it (one handed off half-way is recorded twice), the one that
        // may be attached first.
        for _ in 0..=self.managers.len() {
            let Some((m, _)) = self.find(&r.volume_id)? else { break };
            match m.call("DELETE", &format!("/v1/volumes/{}", r.volume_id), None) {
                Ok(_) => tracing::info!(volume = r.volume_id, host = m.host, "deleted volume"),
                Err(e) if e.status == 404 => {}
                Err(e) => return Err(e.status()),
            }
        }
        // Its replicas on other hosts, after the record (nothing attaches it meanwhile).
        self.delete_replicas(&r.volume_id)?;
        Ok(csi::DeleteVolumeResponse {})
    }

    fn controller_publish(&self, r: csi::ControllerPublishVolumeRequest) -> Result<csi::ControllerPublishVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        need("node_id", &r.node_id)?;
        let cap = check_cap(r.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?)?;
        let _busy = self.hold(&r.volume_id)?;
        let Some(to) = self.manager_of(&r.node_id) else {
            return Err(Status::not_found(format!("node {:?}: no manager of this driver runs there", r.node_id)));
        };
        let (m, v) = match self.find(&r.volume_id) {
            Ok(Some(found)) => found,
            Ok(None) => return Err(Status::not_found(format!("volume {:?}: not found", r.volume_id))),
            // Its host does not answer: served from here if that host is lost.
            Err(e) => match self.take_over(&r.volume_id, to)? {
                Some(v) => (to, v),
                None => return Err(e),
            },
        };
        if cap.multi_node() && v["accessMode"] != "rwx" {
            return Err(Status::already_exists(format!(
                "volume {:?} was made ReadWriteOnce; MULTI_NODE_MULTI_WRITER needs a ReadWriteMany volume",
                r.volume_id
            )));
        }
        if cap.multi_node() {
            return self.publish_shared(m, v, &r.volume_id, &r.node_id);
        }
        let (m, v) = if m.host == r.node_id && v["state"] == "handedOff" {
            // A move away from this node that stopped half-way: the volume stays here.
            m.action(&r.volume_id, "handOff", json!({"undo": true})).map_err(|e| e.status())?;
            let v = m.volume(&r.volume_id).map_err(|e| e.status())?.ok_or_else(|| Status::not_found(format!("volume {:?}", r.volume_id)))?;
            (m, v)
        } else if m.host == r.node_id {
            (m, v)
        } else if v["state"] != "detached" && v["state"] != "handedOff" {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is {} on node {:?}; unpublish it there first",
                r.volume_id,
                v["state"].as_str().unwrap_or("?"),
                m.host
            )));
        } else {
            // The engine follows the node: the volume's record moves to its manager
            // (refused, FAILED_PRECONDITION, for a volume whose replicas are its host's own).
            let to = self.manager_of(&r.node_id).ok_or_else(|| Status::not_found(format!("node {:?}", r.node_id)))?;
            let moved = self.move_volume(&r.volume_id, m, to)?;
            (to, moved)
        };
        let v = match v["state"].as_str().unwrap_or("") {
            "attached" => v,
            "detached" => self.attach(m, &r.volume_id, false)?,
            other => return Err(Status::unavailable(format!("volume {:?} is {other}; try again", r.volume_id))),
        };
        if v["disableFrontend"] == true {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is attached without a block device (NBD export only); detach it first",
                r.volume_id
            )));
        }
        let mut ctx = HashMap::new();
        ctx.insert("devicePath".to_string(), v["endpoint"].as_str().unwrap_or("").to_string());
        Ok(csi::ControllerPublishVolumeResponse { publish_context: ctx })
    }

    /// ReadWriteMany: the volume stays on the host that serves it (or, detached, goes
    /// to the node asking, as Longhorn's share manager starts where it is first
    /// needed); the manager there records the node, and the node mounts the share the
    /// publish context names.
    /// The address `node` mounts shares from: its manager's host address.
    fn node_address(&self, node: &str) -> Result<String, Status> {
        let nm = self.manager_of(node).ok_or_else(|| Status::not_found(format!("node {node:?}: no manager of this driver runs there")))?;
        let info = nm.call("GET", "/v1/node", None).map_err(|e| e.status())?;
        match info["address"].as_str().filter(|a| a.parse::<std::net::IpAddr>().is_ok()) {
            Some(a) => Ok(a.to_string()),
            None => Err(Status::internal(format!("node {node:?}: its manager names no address ({})", info["address"]))),
        }
    }

    fn publish_shared(&self, m: &Manager, v: Value, id: &str, node: &str) -> Result<csi::ControllerPublishVolumeResponse, Status> {
        let (m, v) = match v["state"].as_str().unwrap_or("") {
            "detached" | "handedOff" if m.host != node => {
                let to = self.manager_of(node).ok_or_else(|| Status::not_found(format!("node {node:?}")))?;
                let moved = self.move_volume(id, m, to)?;
                (to, moved)
            }
            "handedOff" => {
                m.action(id, "handOff", json!({"undo": true})).map_err(|e| e.status())?;
                let v = m.volume(id).map_err(|e| e.status())?.ok_or_else(|| Status::not_found(format!("volume {id:?}")))?;
                (m, v)
            }
            _ => (m, v),
        };
        if v["state"] == "attached" && v["disableFrontend"] == true {
            return Err(Status::unavailable(format!("volume {id:?} is attached for a snapshot without its block device; try again")));
        }
        if v["state"] != "attached" && v["state"] != "detached" {
            return Err(Status::unavailable(format!("volume {id:?} is {}; try again", v["state"].as_str().unwrap_or("?"))));
        }
        // The share lets in only the nodes it is published to: the node mounts from its
        // address on the hosts' network, which its own manager knows.
        let client = self.node_address(node)?;
        let body = json!({
            "disableFrontend": false, "frontend": self.frontend.as_deref().unwrap_or("blockdev"),
            "attachedBy": node, "clientAddress": client,
        });
        m.action(id, "attach", body).map_err(|e| e.status())?;
        let v = self.wait_state(m, id, "attached", Duration::from_secs(150))?;
        let ep = v["shareEndpoint"].as_str().unwrap_or("");
        if ep.is_empty() {
            return Err(Status::internal(format!("volume {id:?} is attached on {:?} but its manager names no share", m.host)));
        }
        tracing::info!(volume = id, node, share = ep, host = m.host, "published over NFS");
        let mut ctx = HashMap::new();
        ctx.insert("shareEndpoint".to_string(), ep.to_string());
        Ok(csi::ControllerPublishVolumeResponse { publish_context: ctx })
    }

    fn controller_unpublish(&self, r: csi::ControllerUnpublishVolumeRequest) -> Result<csi::ControllerUnpublishVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        if !ids::valid_name(&r.volume_id) {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        let _busy = self.hold(&r.volume_id)?;
        let found = match self.find(&r.volume_id) {
            Ok(f) => f,
            // Its host is lost: nothing there to detach, and a take-over waits on the
            // replicas' lease for an engine that might still run there.
            Err(_) if self.lost_owner(&r.volume_id).is_some() => return Ok(csi::ControllerUnpublishVolumeResponse {}),
            Err(e) => return Err(e),
        };
        let Some((m, v)) = found else {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        if v["state"] == "detached" {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        // ReadWriteMany: the node lets go; the volume stops with the last one.
        let shared = v["accessMode"] == "rwx" && v["attachedBy"].as_array().is_some_and(|a| !a.is_empty());
        if shared {
            if r.node_id.is_empty() {
                return Err(Status::invalid_argument("node_id: a ReadWriteMany volume is unpublished one node at a time"));
            }
            let after = m.action(&r.volume_id, "detach", json!({"attachedBy": r.node_id})).map_err(|e| e.status())?;
            if after["state"] == "attached" {
                return Ok(csi::ControllerUnpublishVolumeResponse {});
            }
            self.wait_state(m, &r.volume_id, "detached", Duration::from_secs(150))?;
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        if !r.node_id.is_empty() && r.node_id != m.host {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        m.action(&r.volume_id, "detach", json!({})).map_err(|e| e.status())?;
        self.wait_state(m, &r.volume_id, "detached", Duration::from_secs(150))?;
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    /// Grows a volume, offline as Longhorn v1 does (the plugin says OFFLINE, so the
    /// resizer calls this only while no node has it published). The filesystem on it
    /// grows on the node, at NodeExpandVolume.
    fn expand(&self, r: csi::ControllerExpandVolumeRequest) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        need("volume_id", &r.volume_id)?;
        let range = r.capacity_range.ok_or_else(|| Status::invalid_argument("capacity_range: missing"))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(Status::invalid_argument("capacity_range: names no size"));
        }
        let size = ids::size(range.required_bytes, range.limit_bytes)?;
        let block = match &r.volume_capability {
            Some(c) => check_cap(c)?.block,
            None => false,
        };
        let found = if ids::valid_name(&r.volume_id) { self.find(&r.volume_id)? } else { None };
        let _busy = self.hold(&r.volume_id)?;
        let (m, v) = found.ok_or_else(|| Status::not_found(format!("volume {:?}: not found", r.volume_id)))?;
        let cur = vol_size(&v);
        if cur >= size {
            // Already as large (a retry of an expansion that succeeded): nothing to do.
            return Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: cur as i64, node_expansion_required: !block });
        }
        if v["state"] != "detached" {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is {} on host {:?}: it is expanded offline (unpublish it first)",
                r.volume_id,
                v["state"].as_str().unwrap_or("?"),
                m.host
            )));
        }
        if spread(&v) {
            // Each host grows its replicas first; the record's size last, so a retry
            // after a failure half-way finishes (each step is idempotent).
            self.expand_replicas(&r.volume_id, size)?;
        }
        m.action(&r.volume_id, "expand", json!({"size": size.to_string()})).map_err(|e| e.status())?;
        tracing::info!(volume = r.volume_id, host = m.host, from = cur, to = size, "expanded volume");
        Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: size as i64, node_expansion_required: !block })
    }

    fn validate(&self, r: csi::ValidateVolumeCapabilitiesRequest) -> Result<csi::ValidateVolumeCapabilitiesResponse, Status> {
        need("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities: missing"));
        }
        let v = if ids::valid_name(&r.volume_id) { self.find(&r.volume_id)? } else { None };
        let (_, v) = v.ok_or_else(|| Status::not_found(format!("volume {:?}: not found", r.volume_id)))?;
        let mut problem = None;
        for c in &r.volume_capabilities {
            match check_cap(c) {
                Ok(cap) if cap.multi_node() && v["accessMode"] != "rwx" => {
                    problem = Some("MULTI_NODE_MULTI_WRITER needs a volume made ReadWriteMany".to_string())
                }
                Ok(_) => {}
                Err(e) => problem = Some(e.message().to_string()),
            }
        }
        if let Err(e) = ids::volume_params(&r.parameters) {
            problem = Some(e.message().to_string());
        }
        Ok(match problem {
            Some(message) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
        })
    }

    fn list_volumes(&self, r: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse, Status> {
        let mut all = Vec::new();
        let hosts = self.hosts();
        for m in &self.managers {
            for v in m.volumes().map_err(|e| e.status())? {
                // Handed to another host: listed there.
                if v["state"] == "handedOff" {
                    continue;
                }
                let attached = v["state"] == "attached";
                all.push(csi::list_volumes_response::Entry {
                    volume: Some(csi_volume(m, &hosts, &v, None, None)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: if attached { vec![m.host.clone()] } else { vec![] },
                        volume_condition: None,
                    }),
                });
            }
        }
        all.sort_by(|a, b| {
            let id = |e: &csi::list_volumes_response::Entry| e.volume.as_ref().map(|v| v.volume_id.clone()).unwrap_or_default();
            id(a).cmp(&id(b))
        });
        let (entries, next_token) = page(all, r.max_entries, &r.starting_token)?;
        Ok(csi::ListVolumesResponse { entries, next_token })
    }

    fn get_capacity(&self, r: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse, Status> {
        for c in &r.volume_capabilities {
            check_cap(c)?;
        }
        let host = r.accessible_topology.as_ref().and_then(|t| t.segments.get(TOPOLOGY_KEY).cloned());
        let mut free = 0u64;
        for m in &self.managers {
            if host.as_ref().is_some_and(|h| *h != m.host) {
                continue;
            }
            let n = m.node().map_err(|e| e.status())?;
            // A volume's replicas all live on its host: its largest volume is what one
            // host can hold, not the sum over hosts.
            free = free.max(n["storageAvailable"].as_u64().unwrap_or(0));
        }
        Ok(csi::GetCapacityResponse {
            available_capacity: free.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(ids::MAX_SIZE as i64),
            minimum_volume_size: Some(4096),
        })
    }

    fn backup_url(&self, volume: &str, backup: &str) -> Result<String, Status> {
        let mut last = None;
        for m in &self.managers {
            match m.call("POST", &format!("/v1/backupvolumes/{volume}?action=backupGet"), Some(json!({"name": backup}))) {
                Ok(b) => return b["url"].as_str().map(str::to_string).ok_or_else(|| Status::internal("the backup has no url")),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) if e.status == 404 || e.status == 400 => Err(Status::not_found(format!("backup {volume}/{backup}: {}", e.message))),
            Some(e) => Err(e.status()),
            None => Err(Status::not_found(format!("backup {volume}/{backup}: no manager"))),
        }
    }

    fn snapshots_of(&self, m: &Manager, v: &Value) -> Result<Vec<csi::Snapshot>, Status> {
        let name = v["name"].as_str().unwrap_or("");
        if v["state"] != "attached" {
            // A detached volume's chain is read by attaching it only for a create or
            // delete; a list does not start volumes.
            return Ok(Vec::new());
        }
        let ls = m.action(name, "snapshotList", json!({})).map_err(|e| e.status())?;
        let size = vol_size(v) as i64;
        Ok(ls["data"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or(&[])
            .iter()
            .filter(|s| s["name"] != "volume-head" && s["usercreated"] == true && s["removed"] != true)
            .filter_map(|s| {
                let snap = s["name"].as_str()?;
                Some(csi::Snapshot {
                    size_bytes: size,
                    snapshot_id: SnapId::Snap { volume: name.into(), name: snap.into() }.to_string(),
                    source_volume_id: name.into(),
                    creation_time: s["created"].as_str().and_then(timestamp),
                    ready_to_use: true,
                    group_snapshot_id: String::new(),
                })
            })
            .collect())
    }

    /// The backups of a volume on the backup target (none when no target is set).
    fn backups_of(&self, m: &Manager, volume: &str) -> Vec<Value> {
        match m.call("POST", &format!("/v1/backupvolumes/{volume}?action=backupList"), Some(json!({}))) {
            Ok(v) => v["data"].as_array().cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    fn backup_snapshot(volume: &str, size: i64, b: &Value) -> Option<csi::Snapshot> {
        Some(csi::Snapshot {
            size_bytes: size,
            snapshot_id: SnapId::Backup { volume: volume.into(), backup: b["name"].as_str()?.into() }.to_string(),
            source_volume_id: volume.into(),
            creation_time: b["created"].as_str().and_then(timestamp).or_else(|| b["snapshotCreated"].as_str().and_then(timestamp)),
            ready_to_use: b["state"] == "Completed",
            group_snapshot_id: String::new(),
        })
    }

    fn create_snapshot(&self, r: csi::CreateSnapshotRequest) -> Result<csi::CreateSnapshotResponse, Status> {
        need("source_volume_id", &r.source_volume_id)?;
        let snap = ids::volume_name(&r.name)?;
        let backup = ids::snapshot_kind(&r.parameters)?;
        let _busy = self.hold(&format!("snapshot/{snap}"))?;
        let found = if ids::valid_name(&r.source_volume_id) { self.find(&r.source_volume_id)? } else { None };
        let (m, v) = found.ok_or_else(|| Status::not_found(format!("source_volume_id {:?}: no such volume", r.source_volume_id)))?;
        // A snapshot name is the driver's, across volumes: the same name on another
        // volume is another snapshot.
        for om in &self.managers {
            for ov in om.volumes().map_err(|e| e.status())? {
                if ov["name"] == v["name"] {
                    continue;
                }
                if self.snapshots_of(om, &ov)?.iter().any(|s| s.snapshot_id.ends_with(&format!("/{snap}"))) {
                    return Err(Status::already_exists(format!("snapshot {:?} exists, of volume {}", r.name, ov["name"])));
                }
            }
        }
        let vol = r.source_volume_id.clone();
        let size = vol_size(&v) as i64;
        let snapshot = self.with_attached(m, &v, || {
            let have = self.snapshots_of(m, &m.volume(&vol).map_err(|e| e.status())?.unwrap_or(Value::Null))?;
            let id = SnapId::Snap { volume: vol.clone(), name: snap.clone() }.to_string();
            let mut s = match have.into_iter().find(|s| s.snapshot_id == id) {
                Some(s) => s,
                None => {
                    let s = m
                        .action(&vol, "snapshotCreate", json!({"name": snap, "labels": {"csi.longhorn.io/snapshot": r.name}}))
                        .map_err(|e| e.status())?;
                    tracing::info!(volume = vol, snapshot = snap, "created snapshot");
                    csi::Snapshot {
                        size_bytes: size,
                        snapshot_id: id,
                        source_volume_id: vol.clone(),
                        creation_time: s["created"].as_str().and_then(timestamp),
                        ready_to_use: true,
                        group_snapshot_id: String::new(),
                    }
                }
            };
            if backup {
                // A backup is ready when the target holds all of it; the snapshotter
                // calls again until ready_to_use.
                if let Some(b) = self.backups_of(m, &vol).iter().find(|b| b["snapshotName"] == snap.as_str()) {
                    return Self::backup_snapshot(&vol, size, b).ok_or_else(|| Status::internal("a backup without a name"));
                }
                let cur = m.volume(&vol).map_err(|e| e.status())?.unwrap_or(Value::Null);
                let running = cur["backupStatus"].as_array().and_then(|a| a.iter().find(|b| b["snapshot"] == snap.as_str()).cloned());
                let id = match running {
                    Some(b) if b["state"] == "Error" => {
                        return Err(Status::internal(format!("the backup of {snap} failed: {}", b["error"].as_str().unwrap_or(""))))
                    }
                    Some(b) => b["id"].as_str().unwrap_or("").to_string(),
                    None => {
                        let started = m.action(&vol, "snapshotBackup", json!({"name": snap})).map_err(|e| e.status())?;
                        tracing::info!(volume = vol, snapshot = snap, backup = %started["backup"], "started backup");
                        started["backup"].as_str().unwrap_or("").to_string()
                    }
                };
                if !ids::valid_name(&id) {
                    return Err(Status::internal(format!("the manager named the backup {id:?}")));
                }
                s.snapshot_id = SnapId::Backup { volume: vol.clone(), backup: id }.to_string();
                s.ready_to_use = false;
                // Detaching now would cut the backup short: wait for it here.
                if v["state"] == "detached" {
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_secs(3600) {
                        if let Some(b) = self.backups_of(m, &vol).iter().find(|b| b["snapshotName"] == snap.as_str()) {
                            if b["state"] == "Completed" {
                                return Self::backup_snapshot(&vol, size, b).ok_or_else(|| Status::internal("a backup without a name"));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
            Ok(s)
        })?;
        Ok(csi::CreateSnapshotResponse { snapshot: Some(snapshot) })
    }

    fn delete_snapshot(&self, r: csi::DeleteSnapshotRequest) -> Result<csi::DeleteSnapshotResponse, Status> {
        need("snapshot_id", &r.snapshot_id)?;
        let Some(id) = SnapId::parse(&r.snapshot_id) else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        match &id {
            SnapId::Snap { volume, name } => {
                let _busy = self.hold(&format!("snapshot/{name}"))?;
                let Some((m, v)) = self.find(volume)? else {
                    return Ok(csi::DeleteSnapshotResponse {});
                };
                self.with_attached(m, &v, || match m.action(volume, "snapshotDelete", json!({"name": name})) {
                    Ok(_) => Ok(()),
                    Err(e) if e.status == 404 => Ok(()),
                    Err(e) => Err(e.status()),
                })?;
            }
            SnapId::Backup { volume, backup } => {
                let m = self.managers.first().ok_or_else(|| Status::internal("no manager"))?;
                match m.call("POST", &format!("/v1/backupvolumes/{volume}?action=backupDelete"), Some(json!({"name": backup}))) {
                    Ok(_) => {}
                    Err(e) if e.status == 404 => {}
                    Err(e) => return Err(e.status()),
                }
            }
        }
        Ok(csi::DeleteSnapshotResponse {})
    }

    fn list_snapshots(&self, r: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse, Status> {
        let mut all = Vec::new();
        let wanted = if r.snapshot_id.is_empty() {
            None
        } else {
            match SnapId::parse(&r.snapshot_id) {
                Some(id) => Some(id),
                None => return Ok(csi::ListSnapshotsResponse { entries: vec![], next_token: String::new() }),
            }
        };
        let only_volume = wanted.as_ref().map(|w| w.volume().to_string()).or((!r.source_volume_id.is_empty()).then(|| r.source_volume_id.clone()));
        for m in &self.managers {
            for v in m.volumes().map_err(|e| e.status())? {
                let name = v["name"].as_str().unwrap_or("").to_string();
                if only_volume.as_ref().is_some_and(|o| *o != name) {
                    continue;
                }
                all.extend(self.snapshots_of(m, &v)?);
                let size = vol_size(&v) as i64;
                all.extend(self.backups_of(m, &name).iter().filter_map(|b| Self::backup_snapshot(&name, size, b)));
            }
        }
        if let Some(w) = &wanted {
            let w = w.to_string();
            all.retain(|s| s.snapshot_id == w);
        }
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        all.dedup_by(|a, b| a.snapshot_id == b.snapshot_id);
        let (list, next_token) = page(all, r.max_entries, &r.starting_token)?;
        Ok(csi::ListSnapshotsResponse {
            entries: list.into_iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) }).collect(),
            next_token,
        })
    }
}

macro_rules! rpc {
    ($self:ident, $req:ident, $f:ident) => {{
        let d = $self.0.clone();
        let r = $req.into_inner();
        blocking(move || d.$f(r)).await
    }};
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(&self, req: Request<csi::CreateVolumeRequest>) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        rpc!(self, req, create_volume)
    }
    async fn delete_volume(&self, req: Request<csi::DeleteVolumeRequest>) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        rpc!(self, req, delete_volume)
    }
    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        rpc!(self, req, controller_publish)
    }
    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        rpc!(self, req, controller_unpublish)
    }
    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        rpc!(self, req, validate)
    }
    async fn list_volumes(&self, req: Request<csi::ListVolumesRequest>) -> Result<Response<csi::ListVolumesResponse>, Status> {
        rpc!(self, req, list_volumes)
    }
    async fn get_capacity(&self, req: Request<csi::GetCapacityRequest>) -> Result<Response<csi::GetCapacityResponse>, Status> {
        rpc!(self, req, get_capacity)
    }
    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as C};
        let caps = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::ListVolumesPublishedNodes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::PublishReadonly,
            Type::SingleNodeMultiWriter,
            Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability { r#type: Some(C::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities: caps }))
    }
    async fn create_snapshot(&self, req: Request<csi::CreateSnapshotRequest>) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        rpc!(self, req, create_snapshot)
    }
    async fn delete_snapshot(&self, req: Request<csi::DeleteSnapshotRequest>) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        rpc!(self, req, delete_snapshot)
    }
    async fn list_snapshots(&self, req: Request<csi::ListSnapshotsRequest>) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        rpc!(self, req, list_snapshots)
    }
    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        rpc!(self, req, expand)
    }
    async fn controller_get_volume(
        &self,
        _: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume is not offered (GET_VOLUME is not a capability of this driver)"))
    }
    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not offered"))
    }
}
