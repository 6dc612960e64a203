//! Snapshot orchestration across the replica set. Runs on control threads, beside
//! the I/O path: the only contact with I/O is the pause (drain) around a rotation.

use crate::volume::{Mode, Volume};
use longhorn_replica::proto::{self, Header, Op, SnapshotRequest};
use longhorn_replica::snapshot::{check_name, SnapshotInfo};
use std::collections::HashMap;
use std::io::Write;
use longhorn_replica::net::Stream;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long a snapshot may wait for in-flight I/O before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a replica may take to merge a removed snapshot into its child.
const MERGE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A random (version 4) UUID, as Longhorn names snapshots.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_ok();
    if !ok {
        // Fall back on time and pid: unique enough for a name, never used for security.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b[..16].copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// What `snapshot create` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotResult {
    pub name: String,
    /// How long new I/O was held.
    pub pause_us: u64,
    pub replicas: usize,
}

fn exchange(s: &mut Stream, addr: &str, op: Op, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    proto::put_frame(&mut buf, Header::request(op, 1, 0, 0), payload);
    s.write_all(&buf).map_err(|e| format!("replica {addr}: {op:?}: {e}"))?;
    let (h, p) = proto::read_frame(s).map_err(|e| format!("replica {addr}: {op:?}: {e}"))?;
    if h.status != 0 {
        return Err(format!("replica {addr}: {}", String::from_utf8_lossy(&p)));
    }
    Ok(p.to_vec())
}

impl Volume {
    /// The chain-change lock, waited for a few seconds at most: a rebuild holds it while
    /// it copies, and a caller is better told so than left hanging.
    pub(crate) fn control_guard(&self) -> Result<std::sync::MutexGuard<'_, ()>, String> {
        let t = Instant::now();
        loop {
            match self.control.try_lock() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if t.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(format!(
                        "volume {}: another chain change (a rebuild copying data, a snapshot or a removal) is in progress; try again when it is done",
                        self.name()
                    ))
                }
            }
        }
    }

    /// Indices of replicas in RW or WO mode.
    fn writable_replicas(&self) -> Vec<usize> {
        (0..self.replicas.len()).filter(|&i| matches!(self.mode_of(i), Mode::RW | Mode::WO)).collect()
    }

    fn first_rw(&self) -> Result<usize, String> {
        (0..self.replicas.len())
            .find(|&i| self.mode_of(i) == Mode::RW)
            .ok_or_else(|| format!("volume {} has no healthy replica", self.name()))
    }

    /// Runs `op` on each of `targets` in parallel, over connections made beforehand,
    /// waiting at most `timeout` for each answer.
    fn on_replicas(&self, targets: &[usize], op: Op, payload: &[u8], timeout: Duration) -> Vec<(usize, Result<Vec<u8>, String>)> {
        let mut conns = Vec::new();
        for &i in targets {
            let addr = self.addr_of(i);
            let c = self.dialer().connect(&addr).map(|(s, _)| s).map_err(|e| e.to_string());
            conns.push((i, addr, c));
        }
        self.run_on(conns, op, payload, timeout)
    }

    fn run_on(
        &self,
        conns: Vec<(usize, String, Result<Stream, String>)>,
        op: Op,
        payload: &[u8],
        timeout: Duration,
    ) -> Vec<(usize, Result<Vec<u8>, String>)> {
        std::thread::scope(|sc| {
            let hs: Vec<_> = conns
                .into_iter()
                .map(|(i, addr, c)| {
                    sc.spawn(move || {
                        let r = c.and_then(|mut s| {
                            let _ = s.set_read_timeout(Some(timeout));
                            exchange(&mut s, &addr, op, payload)
                        });
                        (i, r)
                    })
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    }

    /// Takes a snapshot on every writable replica. New I/O is held only while the
    /// heads rotate; a replica that fails the rotation is dropped.
    pub fn snapshot(
        &self,
        name: Option<&str>,
        labels: Option<HashMap<String, String>>,
        user_created: bool,
    ) -> Result<SnapshotResult, String> {
        let _ctl = self.control_guard()?;
        self.rotate(name, labels, user_created, &mut || Ok(()))
    }

    /// Takes a snapshot; `in_pause` runs while I/O is still held after the rotation
    /// (the rebuild uses it to attach a replica at exactly that point). The caller
    /// holds the control lock.
    pub(crate) fn rotate(
        &self,
        name: Option<&str>,
        labels: Option<HashMap<String, String>>,
        user_created: bool,
        in_pause: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<SnapshotResult, String> {
        let name = name.map(|s| s.to_string()).unwrap_or_else(new_uuid);
        check_name(&name)?;
        let existing = self.snapshot_list()?;
        if existing.iter().any(|s| s.name == name) {
            return Err(format!("snapshot {name:?} already exists"));
        }
        let targets = self.writable_replicas();
        let mut req = SnapshotRequest {
            name: name.clone(),
            user_created,
            created: longhorn_replica::meta::now_rfc3339(),
            labels,
            prepare: true,
        };
        let prep = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        req.prepare = false;
        let payload = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        // Connect, flush and prepare before the pause, so the pause covers only the
        // commit of each rotation.
        // Every wait here is bounded by the I/O timeout: the commit runs inside the I/O
        // pause, and a replica that does not answer within it is dropped, as the I/O
        // path would drop it.
        let timeout = self.options().io_timeout;
        let mut conns = Vec::new();
        for &i in &targets {
            let addr = self.addr_of(i);
            let c = self.dialer().connect(&addr)
                .map_err(|e| e.to_string())
                .and_then(|(s, _)| s.set_read_timeout(Some(timeout)).map(|_| s).map_err(|e| e.to_string()))
                .and_then(|mut s| exchange(&mut s, &addr, Op::Snapshot, &prep).map(|_| s))
                // Flushed last, so the sync inside the pause finds little to write.
                .and_then(|mut s| exchange(&mut s, &addr, Op::Flush, b"").map(|_| s));
            conns.push((i, addr, c));
        }
        let t = Instant::now();
        self.pause(DRAIN_TIMEOUT).map_err(|e| format!("snapshot {name}: {e}"))?;
        let drained = t.elapsed();
        let results = self.run_on(conns, Op::Snapshot, &payload, timeout);
        let hook = if results.iter().any(|(_, r)| r.is_ok()) { in_pause() } else { Ok(()) };
        self.resume();
        let pause = t.elapsed();
        tracing::debug!(drain_us = drained.as_micros() as u64, total_us = pause.as_micros() as u64, "snapshot pause");
        let mut ok = 0;
        let mut errors = Vec::new();
        for (i, r) in results {
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    self.fail_replica(i, &format!("snapshot {name} failed: {e}"));
                    errors.push(e);
                }
            }
        }
        if ok == 0 {
            return Err(format!("snapshot {name} failed on every replica: {}", errors.join("; ")));
        }
        hook?;
        info!(volume = self.name(), snapshot = %name, pause_us = pause.as_micros() as u64, replicas = ok, "snapshot created");
        Ok(SnapshotResult { name, pause_us: pause.as_micros() as u64, replicas: ok })
    }

    fn first_rw_info(&self) -> Result<longhorn_replica::proto::ReplicaInfo, String> {
        let i = self.first_rw()?;
        let addr = self.addr_of(i);
        let p = self.dialer().call(&addr, Op::Info, b"").map_err(|e| e.to_string())?;
        serde_json::from_slice(&p).map_err(|e| format!("replica {addr}: bad info: {e}"))
    }

    /// Whether anything was written since the last snapshot.
    pub fn head_has_data(&self) -> Result<bool, String> {
        Ok(self.first_rw_info()?.head_has_data)
    }

    /// The revision counter of a healthy replica (the count of writes applied).
    pub fn revision(&self) -> Result<u64, String> {
        Ok(self.first_rw_info()?.revision)
    }

    /// The snapshots as a healthy replica sees them.
    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>, String> {
        let i = self.first_rw()?;
        let addr = &self.addr_of(i);
        let p = self.dialer().call(addr, Op::SnapshotList, b"").map_err(|e| e.to_string())?;
        serde_json::from_slice(&p).map_err(|e| format!("replica {addr}: bad snapshot list: {e}"))
    }

    /// Removes a snapshot on every writable replica (merging its data into its child).
    /// I/O carries on meanwhile.
    pub fn snapshot_remove(&self, name: &str) -> Result<String, String> {
        let _ctl = self.control_guard()?;
        if name == "volume-head" {
            return Err("the volume head cannot be removed".into());
        }
        check_name(name)?;
        let list = self.snapshot_list()?;
        if !list.iter().any(|s| s.name == name) {
            return Err(format!("no snapshot named {name:?}"));
        }
        let payload = serde_json::to_vec(&SnapshotRequest { name: name.to_string(), ..Default::default() })
            .map_err(|e| e.to_string())?;
        let mut outcome = String::new();
        let mut errors = Vec::new();
        // A merge copies data and may take long; it runs beside I/O, not in a pause.
        for (i, r) in self.on_replicas(&self.writable_replicas(), Op::SnapshotRemove, &payload, MERGE_TIMEOUT) {
            match r {
                Ok(p) => outcome = String::from_utf8_lossy(&p).to_string(),
                Err(e) => {
                    warn!(volume = self.name(), snapshot = name, "remove failed on {}: {e}", self.addr_of(i));
                    errors.push(e);
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        info!(volume = self.name(), snapshot = name, "{outcome}");
        Ok(outcome)
    }

    /// Reverts the volume to a snapshot. Refused while clients are connected: their
    /// caches would no longer match the device.
    pub fn snapshot_revert(&self, name: &str) -> Result<(), String> {
        let _ctl = self.control_guard()?;
        check_name(name)?;
        let n = self.live_session_count();
        if n > 0 {
            return Err(format!(
                "volume {} has {n} connected client(s); disconnect them (unmount, detach) before a revert",
                self.name()
            ));
        }
        let list = self.snapshot_list()?;
        match list.iter().find(|s| s.name == name) {
            None => return Err(format!("no snapshot named {name:?}")),
            Some(s) if s.removed => return Err(format!("snapshot {name:?} was removed; it cannot be reverted to")),
            Some(_) => {}
        }
        let req = SnapshotRequest { name: name.to_string(), created: longhorn_replica::meta::now_rfc3339(), ..Default::default() };
        let payload = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        self.pause(DRAIN_TIMEOUT).map_err(|e| e.to_string())?;
        let results = self.on_replicas(&self.writable_replicas(), Op::SnapshotRevert, &payload, self.options().io_timeout);
        self.resume();
        let mut ok = 0;
        for (i, r) in results {
            match r {
                Ok(_) => ok += 1,
                Err(e) => self.fail_replica(i, &format!("revert to {name} failed: {e}")),
            }
        }
        if ok == 0 {
            return Err(format!("revert to {name} failed on every replica"));
        }
        info!(volume = self.name(), snapshot = name, "volume reverted");
        Ok(())
    }

    /// Removes system snapshots (not user-created) and finishes removals left pending.
    pub fn snapshot_purge(&self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        for s in self.snapshot_list()? {
            if s.name == "volume-head" || (s.user_created && !s.removed) {
                continue;
            }
            // A removed layer under the head stays until the head gets a snapshot.
            if s.removed && s.children.iter().any(|c| c == "volume-head") {
                continue;
            }
            done.push(format!("{}: {}", s.name, self.snapshot_remove(&s.name)?));
        }
        Ok(done)
    }
}
