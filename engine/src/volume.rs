//! A volume served from a set of replicas: which replicas are healthy, how a failed one
//! is dropped, and the I/O timeout watchdog.
//!
//! Replica modes: RW (gets reads and writes), WO (gets writes only: being rebuilt), ERR
//! (dropped; needs a rebuild before it is used again). A replica leaves RW/WO only by
//! [`Volume::fail_replica`], which every session applies to its in-flight requests at
//! once, so I/O carries on with the rest.

use crate::api::{BlockBackend, Completer, Session};
use crate::replica_conn::Dialer;
use longhorn_replica::auth::{Credentials, Key};
use longhorn_replica::proto;
use crate::session::EngineSession;
use crate::slots::Slots;
use serde::Serialize;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    RW,
    WO,
    ERR,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::RW,
            1 => Mode::WO,
            _ => Mode::ERR,
        }
    }
}

pub struct ReplicaState {
    pub addr: String,
    mode: AtomicU8,
    reason: Mutex<String>,
    /// Taken out of the set by `replica rm`: no longer listed.
    removed: AtomicBool,
    /// A connection kept open and pinged, so this engine holds the replica's lease even
    /// with no client connected (see `longhorn_replica::server::LEASE`).
    lease: Mutex<Option<longhorn_replica::net::Stream>>,
}

impl ReplicaState {
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
    pub(crate) fn set_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
    pub(crate) fn new(addr: &str, mode: Mode, reason: String) -> ReplicaState {
        ReplicaState {
            addr: addr.to_string(),
            mode: AtomicU8::new(mode as u8),
            reason: Mutex::new(reason),
            removed: AtomicBool::new(false),
            lease: Mutex::new(None),
        }
    }
    pub(crate) fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::Release);
    }
    /// `from` -> `to` only if the mode is still `from`: a drop (ERR) that lands between
    /// a check and a set must not be overwritten. Whether it changed.
    pub(crate) fn change_mode(&self, from: Mode, to: Mode) -> bool {
        self.mode.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
    pub fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What `replica ls` shows for one replica.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaStatus {
    pub address: String,
    pub mode: Mode,
    pub revision: Option<u64>,
    pub head: Option<String>,
    pub chain: Vec<String>,
    pub error: String,
    /// Rebuild progress, while and after the replica is rebuilt.
    pub progress: Option<longhorn_replica::rebuild::RebuildProgress>,
    /// Written since the replicas last agreed (`ReplicaInfo::unsettled`): if the
    /// engine died now, the next one would rebuild it from another replica.
    pub unsettled: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size: u64,
    pub replicas_total: usize,
    pub replicas_rw: usize,
    pub state: String,
    pub frontend: String,
    pub endpoint: String,
}

#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// A replica that has not answered a request for this long is dropped.
    pub io_timeout: Duration,
    /// The volume's secret, proven to every replica (see `longhorn_replica::auth`).
    pub secret: Option<Arc<Key>>,
    /// Add back and rebuild failed replicas that answer again (see `recover`).
    pub auto_rebuild: bool,
    /// With no healthy replica left, take back the newest that answer (see `recover`).
    pub auto_salvage: bool,
    /// The replica this process serves itself (`engine serve --embed-replica`): the
    /// sessions reach it by function call instead of TCP.
    pub embedded: Option<Embedded>,
    /// Offer replicas on this host a memory pool for big writes' data (see
    /// `longhorn_replica::shm`) instead of sending it through their sockets.
    pub shared_memory: bool,
}

/// A replica served by the engine's own process, known to the volume by the address
/// it also listens on for everyone else (rebuild peers, the control calls).
#[derive(Clone)]
pub struct Embedded {
    pub addr: String,
    pub server: Arc<longhorn_replica::ReplicaServer>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedded({})", self.addr)
    }
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions { io_timeout: Duration::from_secs(8), secret: None, auto_rebuild: false, auto_salvage: false, embedded: None, shared_memory: true }
    }
}

/// How often the engine pings each replica to keep its lease.
const LEASE_PING: Duration = Duration::from_secs(2);

pub struct Volume {
    name: String,
    size: u64,
    dialer: Dialer,
    pub(crate) replicas: Slots<Arc<ReplicaState>>,
    opts: VolumeOptions,
    sessions: Mutex<Vec<Weak<crate::session::Inner>>>,
    frontend: Mutex<(String, String)>,
    /// Requests submitted and not yet completed, across all sessions.
    inflight: AtomicU64,
    paused: AtomicBool,
    resume: (Mutex<()>, Condvar),
    /// Serialises chain changes (snapshot, remove, revert).
    pub(crate) control: Mutex<()>,
    pub(crate) stats: IoStats,
    /// The replica that was RW last, when the volume lost its last RW one: the only one
    /// sure to hold every acknowledged write (a replica dropped earlier missed what came
    /// after). Salvage waits for it. The lock also orders drops, so "the last" is one.
    pub(crate) at_fault: Mutex<Option<String>>,
    /// Held while a session registers and connects to the slots, and while a slot is
    /// added and attached to the sessions (and, in salvage, until it turns RW): so every
    /// session has a connection to every slot that takes writes.
    pub(crate) membership: Mutex<()>,
    /// Writes, zeroings and trims completed so far, across all sessions: counted before
    /// the frontend hears of one, so a flush that reads an unchanged count knows no write
    /// completed since it last read it (see `session`'s flush joining).
    pub(crate) mutations: AtomicU64,
}

/// Counters of the requests the volume completed, for the manager's metrics (throughput,
/// IOPS, mean latency: it takes differences between samples). Relaxed adds at
/// completion, where the request's start time is already at hand: one clock read and
/// three uncontended atomic adds per request.
#[derive(Default)]
pub(crate) struct IoStats {
    read: Counters,
    write: Counters,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    latency_ns: AtomicU64,
}

impl Counters {
    fn add(&self, bytes: u64, started: Instant) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.latency_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn load(&self) -> (u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (l(&self.ops), l(&self.bytes), l(&self.latency_ns))
    }
}

impl IoStats {
    pub(crate) fn read(&self, bytes: u64, started: Instant) {
        self.read.add(bytes, started);
    }

    pub(crate) fn write(&self, bytes: u64, started: Instant) {
        self.write.add(bytes, started);
    }
}

/// Sums since the engine started (monotonic). Writes are the requests that carry data;
/// write-zeroes, trims and flushes are not counted.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct VolumeStats {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub read_latency_ns: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub write_latency_ns: u64,
}

impl Volume {
    /// Connects to every replica, keeps those that agree on the volume and size and hold
    /// the newest data (highest revision counter), and marks the rest ERR.
    pub fn start(name: &str, size: u64, addrs: &[String], opts: VolumeOptions) -> io::Result<Arc<Volume>> {
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a volume needs at least one replica"));
        }
        if addrs.len() > 32 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "at most 32 replicas"));
        }
        let id = longhorn_replica::auth::random_id()?;
        let dialer = Dialer { volume: name.to_string(), size, creds: Credentials::engine(opts.secret.clone(), &id) };
        let mut found = Vec::new();
        let mut leases = Vec::new();
        for a in addrs {
            match dialer.connect(a) {
                Ok((s, info)) => {
                    if info.was_dirty {
                        warn!(replica = %a, "replica was not closed cleanly last time");
                    }
                    leases.push(Some(s));
                    found.push((a.clone(), Ok(info)))
                }
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                    // A replica another engine still holds is alive and may have taken
                    // writes the reachable ones lack (one that failed and came back not
                    // yet rebuilt): started without it, this engine could serve old
                    // data and then rebuild the good replicas from it.
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!("not starting volume {name} without replica {a}, which may hold newer data: {e}; start again once the other engine is gone"),
                    ));
                }
                Err(e) => {
                    warn!(replica = %a, "replica unusable: {e}");
                    leases.push(None);
                    found.push((a.clone(), Err(e.to_string())));
                }
            }
        }
        let newest = found
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().filter(|i| !i.rebuilding).map(|i| i.revision))
            .max();
        let Some(newest) = newest else {
            let why: Vec<String> = found.iter().filter_map(|(a, r)| r.as_ref().err().map(|e| format!("{a}: {e}"))).collect();
            return Err(io::Error::other(format!("no usable replica for volume {name}: {}", why.join("; "))));
        };
        let infos: Vec<&proto::ReplicaInfo> = found.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
        let chain = trusted_chain(&infos, newest);
        let candidates: Vec<(&str, &proto::ReplicaInfo)> = found
            .iter()
            .filter_map(|(a, r)| r.as_ref().ok().map(|i| (a.as_str(), i)))
            .filter(|(_, i)| !i.rebuilding && i.revision == newest && snapshot_chain(i) == chain)
            .collect();
        let keep = settled_pick(&candidates).map(str::to_string);
        let replicas = Slots::default();
        for ((a, r), lease) in found.into_iter().zip(leases) {
            let (mode, reason) = match r {
                Ok(i) if i.rebuilding => {
                    let why = "needs rebuild: its last rebuild did not finish".to_string();
                    warn!(replica = %a, "{why}");
                    (Mode::ERR, why)
                }
                Ok(i) if i.revision == newest && snapshot_chain(&i) != chain => {
                    let why = format!("needs rebuild: its snapshots {:?} are not the others' {chain:?}", snapshot_chain(&i));
                    warn!(replica = %a, "{why}");
                    (Mode::ERR, why)
                }
                Ok(i) if i.revision == newest && keep.as_ref().is_some_and(|k| *k != a) => {
                    let why = "needs rebuild: the last engine stopped without closing it, so writes that were in flight \
                               may have reached it and not the others (equal revision counters do not prove equal data)"
                        .to_string();
                    warn!(replica = %a, "{why}");
                    (Mode::ERR, why)
                }
                Ok(i) if i.revision == newest => (Mode::RW, String::new()),
                Ok(i) => {
                    let why = format!("needs rebuild: revision {} is behind {newest}", i.revision);
                    warn!(replica = %a, "{why}");
                    (Mode::ERR, why)
                }
                Err(e) => (Mode::ERR, e),
            };
            let st = ReplicaState::new(&a, mode, reason);
            *st.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
            let _ = replicas.push(Arc::new(st));
        }
        let v = Arc::new(Volume {
            name: name.to_string(),
            size,
            dialer,
            replicas,
            opts,
            sessions: Mutex::new(Vec::new()),
            frontend: Mutex::new((String::new(), String::new())),
            inflight: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            resume: (Mutex::new(()), Condvar::new()),
            control: Mutex::new(()),
            stats: IoStats::default(),
            at_fault: Mutex::new(None),
            membership: Mutex::new(()),
            mutations: AtomicU64::new(0),
        });
        let rw = v.healthy();
        info!(volume = name, size, replicas = v.replicas.len(), healthy = rw, revision = newest, engine = %id, "volume started");
        let weak = Arc::downgrade(&v);
        std::thread::Builder::new().name("io-watchdog".into()).spawn(move || watchdog(weak))?;
        let weak = Arc::downgrade(&v);
        std::thread::Builder::new().name("lease".into()).spawn(move || keep_leases(weak))?;
        if v.opts.auto_rebuild || v.opts.auto_salvage {
            let weak = Arc::downgrade(&v);
            std::thread::Builder::new().name("recover".into()).spawn(move || crate::recover::run(weak))?;
        }
        Ok(v)
    }

    /// Counts a new request in flight; false (and not counted) while paused.
    pub(crate) fn enter_io(&self) -> bool {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn wait_and_enter_io(&self) {
        loop {
            {
                let (m, cv) = &self.resume;
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                while self.paused.load(Ordering::SeqCst) {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
            if self.enter_io() {
                return;
            }
        }
    }

    pub fn stats(&self) -> VolumeStats {
        let (read_ops, read_bytes, read_latency_ns) = self.stats.read.load();
        let (write_ops, write_bytes, write_latency_ns) = self.stats.write.load();
        VolumeStats { read_ops, read_bytes, read_latency_ns, write_ops, write_bytes, write_latency_ns }
    }

    pub(crate) fn leave_io(&self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Holds new I/O and waits for what is in flight to complete. On timeout, resumes
    /// and fails.
    pub(crate) fn pause(&self, timeout: Duration) -> io::Result<()> {
        self.paused.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while self.inflight.load(Ordering::SeqCst) != 0 {
            if t.elapsed() > timeout {
                self.resume();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("in-flight I/O did not drain within {timeout:?}"),
                ));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    pub(crate) fn resume(&self) {
        let (m, cv) = &self.resume;
        let _g = m.lock().unwrap_or_else(|e| e.into_inner());
        self.paused.store(false, Ordering::SeqCst);
        cv.notify_all();
    }

    pub(crate) fn live_session_count(&self) -> usize {
        self.live_sessions().len()
    }

    pub fn options(&self) -> &VolumeOptions {
        &self.opts
    }

    pub fn set_frontend(&self, kind: &str, endpoint: &str) {
        *self.frontend.lock().unwrap_or_else(|e| e.into_inner()) = (kind.to_string(), endpoint.to_string());
    }

    pub(crate) fn register(&self, s: Weak<crate::session::Inner>) {
        let mut v = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(s);
    }

    pub(crate) fn live_sessions(&self) -> Vec<Arc<crate::session::Inner>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner()).iter().filter_map(|w| w.upgrade()).collect()
    }

    /// Drops replica `idx` from service: marks it ERR and has every session settle the
    /// requests it was waiting on. Idempotent.
    pub fn fail_replica(&self, idx: usize, reason: &str) {
        let Some(r) = self.replicas.get(idx) else { return };
        let prev = {
            let mut last = self.at_fault.lock().unwrap_or_else(|e| e.into_inner());
            let prev = r.mode.swap(Mode::ERR as u8, Ordering::AcqRel);
            if Mode::from_u8(prev) == Mode::RW && self.healthy() == 0 {
                *last = Some(r.addr.clone());
            }
            prev
        };
        if Mode::from_u8(prev) == Mode::ERR {
            // Already dropped; still sweep, in case a request outlived the first sweep.
            for s in self.live_sessions() {
                s.drop_replica(idx);
            }
            return;
        }
        *r.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        let left = self.healthy();
        error!(volume = %self.name, replica = %r.addr, healthy_left = left, "replica failed and was dropped: {reason}");
        for s in self.live_sessions() {
            s.drop_replica(idx);
        }
    }

    pub fn healthy(&self) -> usize {
        self.replicas.iter().filter(|(_, r)| r.mode() == Mode::RW).count()
    }

    /// The mode of replica slot `i` (ERR when the slot is empty).
    pub fn mode_of(&self, i: usize) -> Mode {
        self.replicas.get(i).map(|r| r.mode()).unwrap_or(Mode::ERR)
    }

    pub(crate) fn addr_of(&self, i: usize) -> String {
        self.replicas.get(i).map(|r| r.addr.clone()).unwrap_or_default()
    }

    pub fn status(&self) -> VolumeStatus {
        let rw = self.healthy();
        let total = self.replicas.iter().filter(|(_, r)| r.mode() != Mode::ERR || !r.removed()).count();
        let (frontend, endpoint) = self.frontend.lock().unwrap_or_else(|e| e.into_inner()).clone();
        VolumeStatus {
            name: self.name.clone(),
            size: self.size,
            replicas_total: total,
            replicas_rw: rw,
            state: if rw == 0 {
                "faulted".into()
            } else if rw < total {
                "degraded".into()
            } else {
                "healthy".into()
            },
            frontend,
            endpoint,
        }
    }

    /// Asks every replica for its state (a fresh control connection each).
    pub fn replica_status(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .filter(|(_, r)| !r.removed())
            .map(|(i, r)| {
                let mut mode = r.mode();
                let info = if mode == Mode::ERR {
                    None
                } else {
                    match self.dialer.call(&r.addr, longhorn_replica::proto::Op::Info, b"") {
                        Ok(p) => serde_json::from_slice::<longhorn_replica::proto::ReplicaInfo>(&p).ok(),
                        Err(e) if matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                                | std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::UnexpectedEof
                        ) =>
                        {
                            // A replica that died while no I/O ran is found out here.
                            self.fail_replica(i, &format!("not reachable: {e}"));
                            mode = r.mode();
                            None
                        }
                        Err(e) => {
                            // Slow to answer is not failed: a hung replica is dropped by
                            // the I/O timeout when a request waits on it.
                            warn!(replica = %r.addr, "no status from the replica: {e}");
                            None
                        }
                    }
                };
                let progress = info.as_ref().and_then(|i| i.progress.clone());
                ReplicaStatus {
                    address: r.addr.clone(),
                    mode,
                    progress,
                    revision: info.as_ref().map(|i| i.revision),
                    unsettled: info.as_ref().map(|i| i.unsettled),
                    head: info.as_ref().map(|i| i.head.clone()),
                    chain: info.map(|i| i.chain).unwrap_or_default(),
                    error: r.reason(),
                }
            })
            .collect()
    }

    /// Each replica's address, mode and failure reason as the engine has them, without
    /// contacting any replica (for a supervisor that polls often).
    pub fn replica_modes(&self) -> Vec<ReplicaStatus> {
        self.replicas
            .iter()
            .filter(|(_, r)| !r.removed())
            .map(|(_, r)| ReplicaStatus {
                address: r.addr.clone(),
                mode: r.mode(),
                progress: None,
                revision: None,
                unsettled: None,
                head: None,
                chain: Vec::new(),
                error: r.reason(),
            })
            .collect()
    }

    /// Flushes every healthy replica and tells it the engine is closing cleanly.
    pub fn close(&self) {
        for (_, r) in self.replicas.iter() {
            if r.mode() == Mode::ERR {
                continue;
            }
            match self.dialer.call(&r.addr, longhorn_replica::proto::Op::Close, b"") {
                Ok(_) => info!(replica = %r.addr, "replica flushed and closed cleanly"),
                Err(e) => warn!(replica = %r.addr, "clean close failed: {e}"),
            }
        }
    }
}

/// An `Arc<Volume>` as a frontend's backend.
#[derive(Clone)]
pub struct VolumeHandle(pub Arc<Volume>);

impl BlockBackend for VolumeHandle {
    fn name(&self) -> &str {
        &self.0.name
    }
    fn size(&self) -> u64 {
        self.0.size
    }
    fn open_session(&self, completer: Arc<dyn Completer>) -> io::Result<Box<dyn Session>> {
        Ok(Box::new(EngineSession::open(self.0.clone(), completer)?))
    }
}

/// The snapshots of a replica's chain, oldest last.
/// Which one replica to serve when the candidates (newest revision, trusted chain, not
/// half-rebuilt) may differ: `None` when they cannot. Replicas apply the writes of
/// different connections in their own order, and an engine that died (or was cut off
/// from them all) with writes in flight leaves each with the subset it had applied,
/// counted the same. Unless every candidate was closed cleanly with nothing written
/// since, one is kept (a settled one first, else the first listed) and the rest are
/// rebuilt from it, which for a returning replica sends only the ranges that differ.
pub(crate) fn settled_pick<'a>(candidates: &[(&'a str, &proto::ReplicaInfo)]) -> Option<&'a str> {
    if candidates.len() < 2 || !candidates.iter().any(|(_, i)| i.unsettled) {
        return None;
    }
    let pick = candidates.iter().find(|(_, i)| !i.unsettled).unwrap_or(&candidates[0]);
    Some(pick.0)
}

pub(crate) fn snapshot_chain(i: &proto::ReplicaInfo) -> Vec<String> {
    i.chain.iter().filter(|n| n.starts_with("volume-snap-")).cloned().collect()
}

/// Of the replicas with the newest data (revision `newest`, not half-rebuilt), the
/// snapshot chain most of them hold (the first on a tie). A chain change a crash
/// interrupted between the replicas' commits can leave the same data in differently
/// cut chains; only replicas with this chain are trusted, the others are rebuilt.
pub(crate) fn trusted_chain(infos: &[&proto::ReplicaInfo], newest: u64) -> Vec<String> {
    let candidates: Vec<Vec<String>> =
        infos.iter().filter(|i| !i.rebuilding && i.revision == newest).map(|i| snapshot_chain(i)).collect();
    let mut best: Option<(&Vec<String>, usize)> = None;
    for c in &candidates {
        let n = candidates.iter().filter(|d| *d == c).count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((c, n));
        }
    }
    best.map(|(c, _)| c.clone()).unwrap_or_default()
}

/// Pings every replica in use over its lease connection, reconnecting one that broke,
/// so the replicas know this engine is alive even when no client does I/O.
fn keep_leases(v: Weak<Volume>) {
    loop {
        std::thread::sleep(LEASE_PING);
        let Some(v) = v.upgrade() else { return };
        for (_, r) in v.replicas.iter() {
            if r.removed() || r.mode() == Mode::ERR {
                *r.lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
                continue;
            }
            let mut l = r.lease.lock().unwrap_or_else(|e| e.into_inner());
            if l.is_none() {
                match v.dialer.connect(&r.addr) {
                    Ok((s, _)) => *l = Some(s),
                    Err(e) => debug!(replica = %r.addr, "lease connection: {e}"),
                }
            }
            if let Some(s) = l.as_mut() {
                if let Err(e) = lease_call(s, proto::Op::Ping, LEASE_PING) {
                    debug!(replica = %r.addr, "lease ping: {e}");
                    *l = None;
                }
            }
        }
        v.settle_when_idle();
    }
}

/// One request on a replica's lease connection, waiting at most `t` for the answer.
fn lease_call(s: &mut longhorn_replica::net::Stream, op: proto::Op, t: Duration) -> io::Result<bytes::Bytes> {
    use std::io::Write;
    s.set_read_timeout(Some(t))?;
    let mut b = Vec::new();
    proto::put_frame(&mut b, proto::Header::request(op, 1, 0, 0), &[]);
    s.write_all(&b)?;
    let (h, p) = proto::read_frame(s).map_err(|e| io::Error::other(e.to_string()))?;
    if h.status != 0 {
        return Err(io::Error::other(String::from_utf8_lossy(&p).to_string()));
    }
    Ok(p)
}

impl Volume {
    /// Once the volume is idle after writes, tells its RW replicas they agree (SETTLE,
    /// in a short I/O pause with nothing in flight), so that if this engine dies now the
    /// next one serves them all at once instead of rebuilding all but one (see
    /// `settled_pick`). Under steady writes the volume is never idle and nothing is
    /// sent; a replica that does not answer within SETTLE_WAIT stays unsettled.
    fn settle_when_idle(&self) {
        const SETTLE_WAIT: Duration = Duration::from_millis(500);
        if self.inflight.load(Ordering::SeqCst) != 0 || self.healthy() == 0 {
            return;
        }
        let rw: Vec<Arc<ReplicaState>> =
            self.replicas.iter().map(|(_, r)| r.clone()).filter(|r| !r.removed() && r.mode() == Mode::RW).collect();
        let unsettled = rw.iter().any(|r| {
            let mut l = r.lease.lock().unwrap_or_else(|e| e.into_inner());
            let info = l.as_mut().and_then(|s| lease_call(s, proto::Op::Info, SETTLE_WAIT).ok());
            info.and_then(|p| serde_json::from_slice::<proto::ReplicaInfo>(&p).ok()).is_none_or(|i| i.unsettled)
        });
        if !unsettled {
            return;
        }
        // A chain change or rebuild in progress settles nothing: try at the next tick.
        let Ok(_ctl) = self.control.try_lock() else { return };
        if self.pause(SETTLE_WAIT).is_err() {
            return;
        }
        // Modes may have changed before the pause: only replicas RW now, with every
        // write acknowledged by each of them, are vouched for.
        for (_, r) in self.replicas.iter() {
            if r.removed() || r.mode() != Mode::RW {
                continue;
            }
            let mut l = r.lease.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = l.as_mut() {
                if let Err(e) = lease_call(s, proto::Op::Settle, SETTLE_WAIT) {
                    debug!(replica = %r.addr, "settle: {e}");
                    *l = None;
                }
            }
        }
        self.resume();
        debug!(volume = %self.name, "replicas settled");
    }
}

/// Fails replicas that leave requests unanswered past the I/O timeout.
fn watchdog(v: Weak<Volume>) {
    let tick = Duration::from_millis(500);
    loop {
        std::thread::sleep(tick);
        let Some(v) = v.upgrade() else { return };
        let timeout = v.opts.io_timeout;
        let mut late = Vec::new();
        for s in v.live_sessions() {
            late.extend(s.late_replicas(timeout));
        }
        late.sort_unstable();
        late.dedup();
        for idx in late {
            v.fail_replica(idx, &format!("no reply within the I/O timeout of {timeout:?}"));
        }
    }
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// How this engine connects to the volume's replicas.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}
