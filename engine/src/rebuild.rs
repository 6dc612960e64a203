//! Adding a replica to a live volume and rebuilding it online (the replica side is in
//! `longhorn_replica::rebuild`). The engine's part is the choreography:
//!
//! 1. with I/O paused: a system snapshot `S` on the healthy replicas, the new replica
//!    told to start a rebuild onto `S` with their revision counter, and the new
//!    replica attached to every session in mode WO. From the resume on it gets every
//!    write, so it misses nothing after `S`;
//! 2. in the background, the new replica pulls the chain up to `S` from a healthy one
//!    (only what differs, when it already holds some of it);
//! 3. it becomes RW. On any failure it is marked ERR and I/O never noticed.

use crate::volume::{Mode, ReplicaState, Volume};
use longhorn_replica::proto::Op;
use longhorn_replica::rebuild::{BeginRebuild, SyncRequest};
use longhorn_replica::meta::DiskMeta;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};

impl Volume {
    /// Adds the replica at `addr` and starts rebuilding it. Returns once it receives
    /// writes (WO); the copy runs on in the background.
    pub fn add_replica(self: &Arc<Self>, addr: &str) -> Result<String, String> {
        let ctl = self.control_guard()?;
        if self.replicas.iter().any(|(_, r)| r.addr == addr && !r.removed() && r.mode() != Mode::ERR) {
            return Err(format!("replica {addr} is already in the volume"));
        }
        let (_, info) = self.dialer().connect(addr).map_err(|e| e.to_string())?;
        // The new replica dials the source itself: one on another host cannot reach a
        // source on a unix socket or loopback here, so it gets one it can when there is.
        let healthy: Vec<usize> = (0..self.replicas.len()).filter(|&i| self.mode_of(i) == Mode::RW).collect();
        let source = healthy
            .iter()
            .copied()
            .find(|&i| host_local(addr) || !host_local(&self.addr_of(i)))
            .or_else(|| healthy.first().copied())
            .ok_or_else(|| format!("volume {} has no healthy replica to rebuild from", self.name()))?;
        let source_addr = self.addr_of(source);
        let name = crate::snapshot::new_uuid();
        let snap_file = longhorn_replica::snapshot::snap_file(&name);
        let me = self.clone();
        let mut slot = None;
        // Runs inside the I/O pause: each call waits at most the I/O timeout.
        let t = self.options().io_timeout;
        let mut attach = || -> Result<(), String> {
            let rev = me.dialer().call_with_timeout(&source_addr, Op::Revision, b"", t).map_err(|e| e.to_string())?;
            let revision: u64 = String::from_utf8_lossy(&rev).trim().parse().map_err(|_| "bad revision from the source".to_string())?;
            let begin = serde_json::to_vec(&BeginRebuild { snapshot: snap_file.clone(), revision }).map_err(|e| e.to_string())?;
            me.dialer().call_with_timeout(addr, Op::RebuildBegin, &begin, t).map_err(|e| e.to_string())?;
            // An older slot for the same address (a replica that failed) is retired.
            for (_, r) in me.replicas.iter() {
                if r.addr == addr {
                    r.set_removed();
                }
            }
            // See `Volume::membership`: a session opening now sees this slot or is attached.
            let _members = me.membership.lock().unwrap_or_else(|e| e.into_inner());
            let i = me
                .replicas
                .push(Arc::new(ReplicaState::new(addr, Mode::WO, String::new())))
                .map_err(|_| "this engine has used all its replica slots; restart it to add more".to_string())?;
            for s in me.live_sessions() {
                if let Err(e) = s.attach(i) {
                    me.fail_replica(i, &format!("cannot connect: {e}"));
                    return Err(format!("attaching {addr}: {e}"));
                }
            }
            slot = Some(i);
            Ok(())
        };
        self.rotate(Some(&name), None, false, &mut attach)?;
        let Some(i) = slot else { return Err("the replica was not attached".into()) };
        longhorn_replica::fault::point("rebuild:engine-attached");
        info!(volume = self.name(), replica = addr, snapshot = %name, from = %source_addr, had_revision = info.revision, "replica added (WO); rebuilding");
        let me = self.clone();
        let addr2 = addr.to_string();
        let snap_file = snap_file.clone();
        std::thread::Builder::new()
            .name("rebuild".into())
            .spawn(move || {
                // The control lock is held until the copy is done: no snapshot may
                // change the chain being copied.
                let _ctl = ctl_guard_owner(&me);
                let t = Instant::now();
                match me.sync_replica(i, &addr2, &source_addr, &snap_file) {
                    Ok(p) => {
                        longhorn_replica::fault::point("rebuild:engine-synced");
                        // Atomically: a drop (ERR) meanwhile must stand, not be turned RW.
                        let promoted = me.replicas.get(i).is_some_and(|r| r.change_mode(Mode::WO, Mode::RW));
                        if promoted {
                            info!(volume = me.name(), replica = %addr2, secs = t.elapsed().as_secs_f64(), bytes = p, "rebuild done; replica is RW");
                        } else {
                            warn!(volume = me.name(), replica = %addr2, "rebuild done, but the replica was dropped meanwhile; it stays out");
                        }
                    }
                    Err(e) => {
                        error!(volume = me.name(), replica = %addr2, "rebuild failed: {e}");
                        me.fail_replica(i, &format!("rebuild failed: {e}"));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        drop(ctl);
        Ok(format!("replica {addr} added in mode WO; rebuilding from {}", self.addr_of(source)))
    }

    fn sync_replica(&self, i: usize, addr: &str, source: &str, snap_file: &str) -> Result<u64, String> {
        let files = self.dialer().call(source, Op::ChainFiles, b"").map_err(|e| e.to_string())?;
        let mut files: Vec<DiskMeta> = serde_json::from_slice(&files).map_err(|e| format!("bad chain from {source}: {e}"))?;
        // Snapshots taken after the rebuild began are not part of it.
        let Some(end) = files.iter().position(|f| f.name == snap_file) else {
            return Err(format!("{source} no longer has the rebuild snapshot {snap_file}"));
        };
        files.truncate(end + 1);
        let req = serde_json::to_vec(&SyncRequest { source: source.to_string(), files }).map_err(|e| e.to_string())?;
        if self.mode_of(i) != Mode::WO {
            return Err("replica left WO mode before its data was copied".into());
        }
        let p = self.dialer().call_long(addr, Op::RebuildSync, &req).map_err(|e| e.to_string())?;
        let prog: longhorn_replica::rebuild::RebuildProgress = serde_json::from_slice(&p).map_err(|e| e.to_string())?;
        Ok(prog.bytes_sent)
    }

    /// Takes the replica at `addr` out of the volume.
    pub fn remove_replica(&self, addr: &str) -> Result<(), String> {
        let _ctl = self.control_guard()?;
        let Some((i, r)) = self.replicas.iter().find(|(_, r)| r.addr == addr && !r.removed()) else {
            return Err(format!("no replica {addr} in volume {}", self.name()));
        };
        if r.mode() == Mode::RW && self.healthy() == 1 {
            return Err(format!("{addr} is the last healthy replica of {}; add another first", self.name()));
        }
        self.fail_replica(i, "removed by the operator");
        r.set_removed();
        Ok(())
    }
}

/// The rebuild thread's hold on the control lock.
fn ctl_guard_owner(v: &Arc<Volume>) -> std::sync::MutexGuard<'_, ()> {
    v.control.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether only this host can reach `addr`: a unix socket or a loopback address.
fn host_local(addr: &str) -> bool {
    if longhorn_replica::net::unix_path(addr).is_some() {
        return true;
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::host_local;

    #[test]
    fn host_local_addresses() {
        assert!(host_local("unix:/var/lib/longhorn/v/replica-1.sock"));
        assert!(host_local("127.0.0.1:9502"));
        assert!(host_local("[::1]:9502"));
        assert!(host_local("localhost:9502"));
        assert!(!host_local("10.0.0.7:9502"));
        assert!(!host_local("[fd00::7]:9502"));
        assert!(!host_local("node-b:9502"));
    }
}
