//! One frontend connection's I/O path: fan-out of writes, choice of read replica,
//! collection of replies, and settling requests when a replica is dropped.
//!
//! Each session owns its own connection to every replica, and one thread that collects
//! the replies of all of them (`replies`), so sessions share nothing on the hot path
//! but the replica modes (atomics). A request is tracked by id with a bitmask of the
//! replicas it still waits for:
//! - a write, write-zeroes, trim or flush completes when that mask is empty, successfully
//!   only if at least one replica that was RW when it answered applied it (a replica
//!   that failed it has been dropped). A WO replica is being rebuilt: its volume.meta
//!   says Rebuilding and no engine will ever trust it after a restart, so its
//!   acknowledgement alone would be a promise nothing keeps;
//! - a read or block-status goes to one RW replica; if that replica is dropped it is
//!   sent again to another one.
//! Target selection and insertion happen under the same lock `drop_replica` takes after
//! the mode changes, so no request can slip past a failure and wait forever.

use crate::api::{Completer, Extent, IoOp, IoResult, Session};
use crate::replica_conn::{self, ReplicaConn};
use crate::replies::{Collector, Handler, Lost};
use crate::slots::Slots;
use crate::volume::{Mode, Volume};
use bytes::Bytes;
use longhorn_replica::proto::{self, FrameError, Header, Op, ReplicaInfo, FLAG_FUA, MAX_IO};
use longhorn_replica::shm::{self, Pool};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::cell::Cell;
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    BlockStatus,
    Mutate,
    Flush,
}

struct Pending {
    tag: u64,
    /// The [`Group`] this request is a piece of, or 0.
    group: u64,
    kind: Kind,
    offset: u64,
    len: u32,
    waiting: u32,
    /// Replicas that applied it while RW.
    acked_rw: u32,
    err: i32,
    started: Instant,
    /// A write carrying data (counted in the volume's stats; zeroes and trims are not).
    data: bool,
    /// Flushes that joined this one (see `join_flush`): their tags, settled with it.
    joined: Vec<u64>,
}

/// Zeroing or trimming a long range, sent to the replicas in pieces: passed whole, a
/// multi-GiB WRITE_ZEROES could keep every replica busy past the I/O timeout at once,
/// and all of them would be dropped. A few pieces are in flight at a time; each has
/// its own timeout, as any request has.
struct Group {
    tag: u64,
    op: Op,
    fua: bool,
    /// Start of the first piece not sent yet.
    next: u64,
    end: u64,
    in_flight: u32,
    err: i32,
}

/// How much of the volume one replica reads before the next takes over (see
/// `pick_reader`): a 1 MiB sequential read still spreads over every replica.
const READ_STRIPE: u64 = 1 << 20;

/// Largest piece of a zeroing or trim sent to a replica, and how many are in flight.
const PIECE: u64 = 16 << 20;
const PIECES_IN_FLIGHT: u32 = 4;

pub(crate) struct Inner {
    volume: Arc<Volume>,
    completer: Arc<dyn Completer>,
    conns: Slots<Arc<ReplicaConn>>,
    ops: Mutex<HashMap<u64, Pending>>,
    groups: Mutex<HashMap<u64, Group>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The slot of the replica embedded in this process, or [`NO_SLOT`].
    local: AtomicUsize,
    /// The last flush sent to the replicas: its id and the volume's `mutations` count
    /// read before it was sent.
    last_flush: Mutex<(u64, u64)>,
    /// Memory shared with the replicas on this host for big writes' data, made when the
    /// first of them is connected (`None` inside: it could not be made).
    pool: OnceLock<Option<Arc<Pool>>>,
    /// The pool was found full once (logged once per session).
    pool_dry: AtomicBool,
    /// Read the replies of the replicas reached through sockets (see `replies` and
    /// `Inner::collector`).
    collector: Mutex<Collectors>,
    /// Sends the collector must not make itself (see `off_collector`), to the thread
    /// that makes them, started when first needed.
    sender: Mutex<Option<mpsc::Sender<SendJob>>>,
    me: Weak<Inner>,
}

/// A session's reply collectors (see [`Inner::collector`]).
#[derive(Default)]
struct Collectors {
    /// For the replicas on this host.
    shared: Option<Arc<Collector>>,
    /// One for each replica on another host.
    own: Vec<Arc<Collector>>,
}

/// Work for a session's sender thread.
type SendJob = Box<dyn FnOnce(&Inner) + Send>;

thread_local! {
    /// Set on a session's reply collector thread.
    static ON_COLLECTOR: Cell<bool> = const { Cell::new(false) };
}

const NO_SLOT: usize = usize::MAX;

pub struct EngineSession {
    inner: Arc<Inner>,
}

fn bit(i: usize) -> u32 {
    1u32 << i
}

/// The outcome of a write, zeroing, trim or flush every target has answered or left.
fn mutate_result(p: &Pending) -> IoResult {
    if p.acked_rw != 0 {
        IoResult::Done
    } else {
        IoResult::Err(if p.err != 0 { p.err } else { libc::EIO })
    }
}

impl EngineSession {
    pub fn open(volume: Arc<Volume>, completer: Arc<dyn Completer>) -> std::io::Result<EngineSession> {
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            volume: volume.clone(),
            completer,
            conns: Slots::default(),
            ops: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            local: AtomicUsize::new(NO_SLOT),
            last_flush: Mutex::new((0, u64::MAX)),
            pool: OnceLock::new(),
            pool_dry: AtomicBool::new(false),
            collector: Mutex::new(Collectors::default()),
            sender: Mutex::new(None),
        });
        // Registered and connected as one step against slots being added (rebuild,
        // salvage), which attach to the sessions registered at that moment.
        let _members = volume.membership.lock().unwrap_or_else(|e| e.into_inner());
        volume.register(Arc::downgrade(&inner));
        for (i, r) in volume.replicas.iter() {
            if r.mode() != Mode::ERR {
                if let Err(e) = inner.attach(i) {
                    volume.fail_replica(i, &format!("cannot connect: {e}"));
                }
            }
        }
        Ok(EngineSession { inner })
    }
}

impl Inner {
    /// Opens this session's connection to replica slot `i` and hands its replies to the
    /// session's collector.
    pub(crate) fn attach(self: &Arc<Self>, i: usize) -> std::io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            // A session on its way out takes no new replica, and refusing would make a
            // rebuild or salvage fail the replica over a client that left.
            return Ok(());
        }
        let addr = self.volume.addr_of(i);
        if let Some(e) = self.volume.options().embedded.as_ref().filter(|e| e.addr == addr) {
            // The replica in this process: requests are function calls, replies come
            // back through the sink (inline, or from its sync thread and readers).
            let me = Arc::downgrade(self);
            let sink: longhorn_replica::server::Sink = Box::new(move |h, p| {
                let Some(me) = me.upgrade() else { return };
                if let Some(reason) = me.on_reply(i, h, p) {
                    me.volume.fail_replica(i, &reason);
                }
                if !replica_conn::inline() {
                    me.completer.flush();
                }
            });
            let d = self.volume.dialer();
            let l = e.server.connect_local(&d.volume, d.size, &d.creds.engine, sink).map_err(std::io::Error::other)?;
            if self.conns.set(i, Arc::new(ReplicaConn::local(&addr, l))).is_err() {
                return Err(std::io::Error::other(format!("replica slot {i} already connected")));
            }
            self.local.store(i, Ordering::Relaxed);
            return Ok(());
        }
        let (mut s, info) = self.volume.dialer().connect(&addr)?;
        let mut shared = false;
        if let Some(pool) = self.pool_for(&addr, &info) {
            match replica_conn::offer_pool(&mut s, &addr, &pool) {
                Ok(ok) => shared = ok,
                Err(e) => {
                    // Where the exchange stopped is unknown: a fresh connection,
                    // payloads inline, rather than a replica dropped for it.
                    warn!(replica = %addr, "offering shared memory failed ({e}): connecting again without it");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    s = self.volume.dialer().connect(&addr)?.0;
                }
            }
        }
        let c = ReplicaConn::new(&addr, s, shared)?;
        let rd = c.reader()?.ok_or_else(|| std::io::Error::other("a TCP connection without a socket"))?;
        let col = match self.collector(&addr) {
            Ok(col) => col,
            Err(_) if self.closed.load(Ordering::Acquire) => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.conns.set(i, Arc::new(c)).is_err() {
            return Err(std::io::Error::other(format!("replica slot {i} already connected")));
        }
        match col.add(i, rd) {
            Err(_) if self.closed.load(Ordering::Acquire) => Ok(()),
            r => r,
        }
    }
}

impl Inner {
    /// The pool to offer the replica at `addr`, if it is on this host and takes one.
    fn pool_for(&self, addr: &str, info: &ReplicaInfo) -> Option<Arc<Pool>> {
        if !self.volume.options().shared_memory || !info.shared_writes || !replica_conn::on_this_host(addr) {
            return None;
        }
        self.pool
            .get_or_init(|| match Pool::new(shm::POOL_LEN) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    warn!("no memory shared with the replicas on this host ({e}): big writes go through their sockets");
                    None
                }
            })
            .clone()
    }

    /// What to send the targets that share the pool instead of `h`: a write's data put
    /// there once for all of them (WRITE_SHARED; `h` carries the data's CRC already),
    /// or a region lent for a read's data (READ_SHARED). None: no such target, too
    /// small, or no room.
    fn share(&self, id: u64, h: &Header, body: &Bytes, targets: &[usize], staged: Option<u64>) -> Option<(Header, Bytes)> {
        let (op, len) = match h.op {
            Op::Write => (Op::WriteShared, body.len()),
            Op::Read => (Op::ReadShared, h.count as usize),
            _ => return None,
        };
        if len < shm::MIN_SHARED {
            return None;
        }
        let holders = targets.iter().filter(|&&i| self.conns.get(i).is_some_and(|c| c.is_shared())).fold(0, |m, &i| m | bit(i));
        let pool = self.pool.get()?.as_ref()?;
        let offset = match (op, staged) {
            _ if holders == 0 => return None,
            // Already in the pool: lent as it is, no copy.
            (Op::WriteShared, Some(off)) => pool.lend_staged(id, holders).then_some(off),
            (Op::WriteShared, None) => pool.put(id, body, holders),
            _ => pool.lend(id, len, holders),
        };
        let Some(offset) = offset else {
            if !self.pool_dry.swap(true, Ordering::Relaxed) {
                warn!(lent_bytes = pool.units_lent() as u64 * shm::UNIT, "the shared-memory pool is full: big requests go through the sockets until regions come back");
            }
            return None;
        };
        let d = shm::Descriptor { offset, crc: if op == Op::WriteShared { h.crc } else { 0 } };
        let d = d.encode();
        let sh = replica_conn::seal(Header { op, ..*h }, &d);
        Some((sh, Bytes::copy_from_slice(&d)))
    }
}

impl Drop for EngineSession {
    fn drop(&mut self) {
        // Under the collector's lock: a connection attached from now on finds the
        // session closing and starts no collector.
        let cols: Vec<Arc<Collector>> = {
            let c = self.inner.collector.lock().unwrap_or_else(|e| e.into_inner());
            self.inner.closed.store(true, Ordering::Release);
            c.shared.iter().chain(c.own.iter()).cloned().collect()
        };
        for (_, c) in self.inner.conns.iter() {
            c.shutdown();
        }
        for c in cols {
            c.stop();
        }
    }
}

impl Session for EngineSession {
    fn submit(&self, tag: u64, op: IoOp) {
        self.inner.submit(tag, op)
    }

    fn push(&self) {
        self.inner.push_all();
    }

    fn write_buffer(&self, len: usize) -> Option<crate::api::WriteBuffer> {
        let i = &self.inner;
        if len < shm::MIN_SHARED || len > MAX_IO as usize || !i.conns.iter().any(|(_, c)| c.is_shared()) {
            return None;
        }
        let pool = i.pool.get()?.as_ref()?;
        // The request's id, taken now: the region is found again by it at submit.
        pool.stage(i.next_id.fetch_add(1, Ordering::Relaxed), len)
    }
}

impl Inner {
    fn writable(&self, i: usize) -> bool {
        self.conns.get(i).is_some() && matches!(self.volume.mode_of(i), Mode::RW | Mode::WO)
    }

    fn readable(&self, i: usize) -> bool {
        self.conns.get(i).is_some() && self.volume.mode_of(i) == Mode::RW
    }

    /// The replica that reads `offset`: the volume is dealt out to the replicas in
    /// [`READ_STRIPE`] pieces, so each replica's host caches its own share of the volume
    /// instead of every host caching the same blocks (round robin made the page caches
    /// of N replicas hold one volume's worth between them, not N). A piece whose
    /// replica is not RW (or is `not`) goes to the next one that is.
    ///
    /// The embedded replica, when it is RW, reads everything instead: a read there costs
    /// a page-cache copy on this thread, one through a socket costs two hand-offs and
    /// two copies (Longhorn's data locality serves reads locally for the same reason).
    fn pick_reader(&self, offset: u64, not: Option<usize>) -> Option<usize> {
        let local = self.local.load(Ordering::Relaxed);
        if local != NO_SLOT && Some(local) != not && self.readable(local) {
            return Some(local);
        }
        let n = self.conns.len().max(1);
        let start = (offset / READ_STRIPE) as usize % n;
        (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != not && self.readable(i))
    }

    fn submit(&self, tag: u64, op: IoOp) {
        // Counted in flight before anything else, so a pause that sees zero in flight
        // knows no request can still reach a replica until it resumes.
        if !self.volume.enter_io() {
            // Paused (a snapshot is being taken): send what is buffered, then wait.
            self.push_all();
            self.volume.wait_and_enter_io();
        }
        let size = self.volume.size();
        let (kind, offset, len, payload, fua, pop) = match &op {
            IoOp::Read { offset, len } => (Kind::Read, *offset, *len, None, false, Op::Read),
            IoOp::BlockStatus { offset, len } => (Kind::BlockStatus, *offset, *len, None, false, Op::BlockStatus),
            IoOp::Write { offset, data, fua } => (Kind::Mutate, *offset, data.len() as u32, Some(data), *fua, Op::Write),
            IoOp::WriteZeroes { offset, len, fua } => (Kind::Mutate, *offset, *len, None, *fua, Op::WriteZeroes),
            IoOp::Trim { offset, len, fua } => (Kind::Mutate, *offset, *len, None, *fua, Op::Trim),
            IoOp::Flush => (Kind::Flush, 0, 0, None, false, Op::Flush),
        };
        if let IoOp::Write { data, .. } = &op {
            if data.len() > MAX_IO as usize {
                return self.done(tag, IoResult::Err(libc::EINVAL));
            }
        }
        if kind != Kind::Flush {
            // Only reads and writes move data; the others may cover any length.
            if len > MAX_IO && kind == Kind::Read {
                return self.done(tag, IoResult::Err(libc::EINVAL));
            }
            if offset.checked_add(len as u64).is_none_or(|e| e > size) {
                let e = if kind == Kind::Mutate { libc::ENOSPC } else { libc::EINVAL };
                return self.done(tag, IoResult::Err(e));
            }
            if len == 0 {
                let r = match kind {
                    Kind::Read => IoResult::Data(Bytes::new()),
                    Kind::BlockStatus => IoResult::Extents(Vec::new()),
                    _ => IoResult::Done,
                };
                return self.done(tag, r);
            }
        }
        if matches!(pop, Op::WriteZeroes | Op::Trim) && len as u64 > PIECE {
            let gid = self.next_id.fetch_add(1, Ordering::Relaxed);
            let g = Group { tag, op: pop, fua, next: offset, end: offset + len as u64, in_flight: 0, err: 0 };
            self.groups.lock().unwrap_or_else(|e| e.into_inner()).insert(gid, g);
            return self.pump(gid);
        }
        // A write received into the pool (`write_buffer`) keeps the id it was staged for.
        let staged = match (&op, self.pool.get()) {
            (IoOp::Write { data, .. }, Some(Some(pool))) if data.len() >= shm::MIN_SHARED => pool.staged_at(data),
            _ => None,
        };
        let id = staged.map_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed), |(id, _)| id);
        let targets: Vec<usize> = {
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            if kind == Kind::Flush && self.join_flush(&mut ops, tag, id) {
                return;
            }
            let targets: Vec<usize> = match kind {
                Kind::Read | Kind::BlockStatus => self.pick_reader(offset, None).into_iter().collect(),
                _ => (0..self.conns.len()).filter(|&i| self.writable(i)).collect(),
            };
            // Nothing is written without a replica that counts (see the module comment).
            if !targets.iter().any(|&i| self.readable(i)) {
                drop(ops);
                return self.done(tag, IoResult::Err(libc::EIO));
            }
            let waiting = targets.iter().fold(0, |m, &i| m | bit(i));
            let data = pop == Op::Write;
            ops.insert(id, Pending { tag, group: 0, kind, offset, len, waiting, acked_rw: 0, err: 0, started: Instant::now(), data, joined: Vec::new() });
            targets
        };
        let mut h = Header::request(pop, id, offset, len);
        if fua {
            h.flags |= FLAG_FUA;
        }
        let body = payload.cloned().unwrap_or_default();
        // Checksummed once for every replica reached over the network; the one in this
        // process needs none (a 1 MiB CRC is tens of microseconds).
        let h = if targets.iter().any(|&i| self.conns.get(i).is_some_and(|c| !c.is_local())) {
            replica_conn::seal(h, &body)
        } else {
            h
        };
        let shared = self.share(id, &h, &body, &targets, staged.map(|(_, off)| off));
        for i in targets {
            if let Some(c) = self.conns.get(i) {
                let sent = match &shared {
                    Some((sh, d)) if c.is_shared() => c.send(*sh, d, false),
                    _ => c.send(h, &body, false),
                };
                if let Err(e) = sent {
                    self.volume.fail_replica(i, &format!("send failed: {e}"));
                }
            }
        }
    }

    /// A flush that arrives while this session's last flush is still on its way, with
    /// no write, zeroing or trim completed anywhere in the volume since that one was
    /// sent, joins it instead of being sent again: every write it must cover completed
    /// before that flush was sent, so that flush covers it (each replica syncs all it
    /// has applied when the flush reaches it). Clients flush back to back (fio's --fsync
    /// at a queue depth sends one flush for every two or three writes); each would cost
    /// a frame to every replica and back. Returns false, having noted `id` as the last
    /// flush, when this one must be sent.
    fn join_flush(&self, ops: &mut HashMap<u64, Pending>, tag: u64, id: u64) -> bool {
        let seen = self.volume.mutations.load(Ordering::Acquire);
        let mut last = self.last_flush.lock().unwrap_or_else(|e| e.into_inner());
        if last.1 == seen {
            if let Some(p) = ops.get_mut(&last.0) {
                p.joined.push(tag);
                return true;
            }
        }
        *last = (id, seen);
        false
    }

    /// A write, zeroing, trim or flush every target has answered or left, taken out of
    /// `ops`: counted (before the frontend hears of it, see `Volume::mutations`) and
    /// settled, with the flushes that joined it.
    fn settle_mutation(&self, p: Pending) {
        if p.kind == Kind::Mutate {
            self.volume.mutations.fetch_add(1, Ordering::AcqRel);
        }
        let r = mutate_result(&p);
        for &t in &p.joined {
            let r = match r {
                IoResult::Err(e) => IoResult::Err(e),
                _ => IoResult::Done,
            };
            self.finish(t, r);
        }
        self.settle(p.tag, p.group, r);
    }

    fn done(&self, tag: u64, r: IoResult) {
        self.finish(tag, r);
        self.completer.flush();
    }

    /// Sends the next pieces of group `gid`, or completes it when all have answered.
    fn pump(&self, gid: u64) {
        loop {
            let (op, fua, off, n) = {
                let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
                let Some(g) = groups.get_mut(&gid) else { return };
                if g.err != 0 || g.next >= g.end {
                    if g.in_flight == 0 {
                        let (tag, err) = (g.tag, g.err);
                        groups.remove(&gid);
                        drop(groups);
                        return self.done(tag, if err == 0 { IoResult::Done } else { IoResult::Err(err) });
                    }
                    return;
                }
                if g.in_flight >= PIECES_IN_FLIGHT {
                    return;
                }
                let n = (g.end - g.next).min(PIECE);
                let off = g.next;
                g.next += n;
                g.in_flight += 1;
                (g.op, g.fua, off, n as u32)
            };
            if let Err(e) = self.send_piece(gid, op, fua, off, n) {
                self.piece_done(gid, IoResult::Err(e), false);
            }
        }
    }

    /// One piece of a group, to every writable replica; `Err(errno)` if none counts.
    fn send_piece(&self, gid: u64, op: Op, fua: bool, offset: u64, len: u32) -> Result<(), i32> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<usize> = {
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            let targets: Vec<usize> = (0..self.conns.len()).filter(|&i| self.writable(i)).collect();
            if !targets.iter().any(|&i| self.readable(i)) {
                return Err(libc::EIO);
            }
            let waiting = targets.iter().fold(0, |m, &i| m | bit(i));
            let p = Pending { tag: 0, group: gid, kind: Kind::Mutate, offset, len, waiting, acked_rw: 0, err: 0, started: Instant::now(), data: false, joined: Vec::new() };
            ops.insert(id, p);
            targets
        };
        let mut h = Header::request(op, id, offset, len);
        if fua {
            h.flags |= FLAG_FUA;
        }
        let h = replica_conn::seal(h, &[]);
        for i in targets {
            if let Some(c) = self.conns.get(i) {
                // Pushed now: later pieces are sent after replies (by the session's
                // sender thread, see `off_collector`), with no frontend push to follow.
                if let Err(e) = c.send(h, &Bytes::new(), true) {
                    self.volume.fail_replica(i, &format!("send failed: {e}"));
                }
            }
        }
        Ok(())
    }

    /// A piece of group `gid` is settled; sends more (when `pump`) or completes it.
    fn piece_done(&self, gid: u64, r: IoResult, pump: bool) {
        {
            let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
            let Some(g) = groups.get_mut(&gid) else { return };
            g.in_flight -= 1;
            if let IoResult::Err(e) = r {
                if g.err == 0 {
                    g.err = e;
                }
            }
        }
        if pump {
            self.off_collector(move |me| me.pump(gid));
        }
    }

    /// Ends a pending request: its frontend request, or a piece of a group.
    fn settle(&self, tag: u64, group: u64, r: IoResult) {
        if group == 0 {
            self.finish(tag, r);
        } else {
            // A piece the embedded replica answered inline: the `pump` that sent it
            // goes on by itself (pumping here would nest once per piece).
            self.piece_done(group, r, !replica_conn::inline());
        }
    }

    /// Every request ends here exactly once.
    fn finish(&self, tag: u64, r: IoResult) {
        self.completer.complete(tag, r);
        self.volume.leave_io();
    }

    fn push_all(&self) {
        // The network first, so the remote replicas work while the embedded one does.
        let mut local = false;
        for (i, c) in self.conns.iter().filter(|(_, c)| !c.is_local()).chain(self.conns.iter().filter(|(_, c)| c.is_local())) {
            local |= c.is_local();
            if let Err(e) = c.push() {
                if self.volume.mode_of(i) != Mode::ERR {
                    self.volume.fail_replica(i, &format!("send failed: {e}"));
                }
            }
        }
        if local {
            // What the embedded replica answered inline.
            self.completer.flush();
        }
    }

    /// The collector for the connection to the replica at `addr`, its thread started
    /// on first use; Err once the session is closing. The replicas on this host share
    /// one: a write's replies come back together, and one wake-up takes them all. A
    /// replica on another host gets one of its own: receiving is where the network's
    /// per-segment work is paid (a 1 MiB read is hundreds of segments), and one thread
    /// receiving for three hosts puts all of it on one CPU (74% busy in the run below),
    /// where hosts with many cores would spread it. Measured with 3 replicas in network
    /// namespaces of their own (veth), 1 MiB reads QD8, six alternating runs each: one
    /// shared collector 1479-1689 MiB/s, one per connection 1391-1855 (medians 1603
    /// and 1684); 4k writes level.
    fn collector(self: &Arc<Self>, addr: &str) -> std::io::Result<Arc<Collector>> {
        let mut c = self.collector.lock().unwrap_or_else(|e| e.into_inner());
        let local = replica_conn::on_this_host(addr);
        if local {
            if let Some(c) = c.shared.as_ref() {
                return Ok(c.clone());
            }
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(std::io::Error::other("the session is closing"));
        }
        let col = Arc::new(Collector::new()?);
        let (me, run) = (self.clone(), col.clone());
        std::thread::Builder::new().name("replica-replies".into()).spawn(move || {
            ON_COLLECTOR.with(|f| f.set(true));
            run.run(&*me)
        })?;
        if local {
            c.shared = Some(col.clone());
        } else {
            c.own.push(col.clone());
        }
        Ok(col)
    }

    /// Applies one reply. Returns a reason when the replica must be dropped.
    fn on_reply(&self, idx: usize, h: Header, payload: Bytes) -> Option<String> {
        let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = ops.get_mut(&h.id) else {
            // A reply to a request already settled (e.g. re-sent after a drop).
            debug!(id = h.id, "late reply ignored");
            return None;
        };
        if p.waiting & bit(idx) == 0 {
            return None;
        }
        if h.status != 0 {
            let why = format!(
                "{:?} at offset {} len {} failed: {} (errno {})",
                p.kind,
                p.offset,
                p.len,
                String::from_utf8_lossy(&payload),
                h.status
            );
            p.err = h.status as i32;
            return Some(why);
        }
        match p.kind {
            Kind::Read | Kind::BlockStatus => {
                let result = if p.kind == Kind::Read {
                    if payload.len() != p.len as usize {
                        return Some(format!("read reply of {} bytes for a {}-byte read", payload.len(), p.len));
                    }
                    IoResult::Data(payload)
                } else {
                    match proto::decode_extents(&payload) {
                        Some(e) => IoResult::Extents(e.into_iter().map(|(len, hole)| Extent { len, hole }).collect()),
                        None => return Some("malformed block-status reply".into()),
                    }
                };
                let (tag, counted) = (p.tag, (p.kind == Kind::Read).then_some((p.len, p.started)));
                ops.remove(&h.id);
                drop(ops);
                // Counted after the lock is released: other replies need it, the stats do not.
                if let Some((len, started)) = counted {
                    self.volume.stats.read(len as u64, started);
                }
                self.finish(tag, result);
            }
            Kind::Mutate | Kind::Flush => {
                p.waiting &= !bit(idx);
                if self.volume.mode_of(idx) == Mode::RW {
                    p.acked_rw |= bit(idx);
                }
                if p.waiting == 0 {
                    let counted = (p.data && p.acked_rw != 0).then_some((p.len, p.started));
                    let Some(p) = ops.remove(&h.id) else { return None };
                    drop(ops);
                    if let Some((len, started)) = counted {
                        self.volume.stats.write(len as u64, started);
                    }
                    self.settle_mutation(p);
                }
            }
        }
        None
    }

    /// Settles every request waiting on replica `idx`, which has just been marked ERR.
    pub(crate) fn drop_replica(&self, idx: usize) {
        let mut finished = Vec::new();
        let mut settled = Vec::new();
        let mut resend = Vec::new();
        {
            let mut ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = ops.iter().filter(|(_, p)| p.waiting & bit(idx) != 0).map(|(&id, _)| id).collect();
            for id in ids {
                let Some(p) = ops.get_mut(&id) else { continue };
                p.waiting &= !bit(idx);
                match p.kind {
                    Kind::Read | Kind::BlockStatus => match self.pick_reader(p.offset, Some(idx)) {
                        Some(j) => {
                            p.waiting = bit(j);
                            p.started = Instant::now();
                            let op = if p.kind == Kind::Read { Op::Read } else { Op::BlockStatus };
                            resend.push((j, Header::request(op, id, p.offset, p.len)));
                        }
                        None => {
                            let tag = p.tag;
                            ops.remove(&id);
                            finished.push((tag, 0, IoResult::Err(libc::EIO)));
                        }
                    },
                    Kind::Mutate | Kind::Flush => {
                        if p.waiting == 0 {
                            if let Some(p) = ops.remove(&id) {
                                settled.push(p);
                            }
                        }
                    }
                }
            }
        }
        if let Some(c) = self.conns.get(idx) {
            c.shutdown();
        }
        if !resend.is_empty() {
            self.off_collector(move |me| me.resend(resend));
        }
        for (tag, group, r) in finished {
            self.settle(tag, group, r);
        }
        for p in settled {
            self.settle_mutation(p);
        }
        self.completer.flush();
    }

    /// Sends reads again to the replicas `drop_replica` chose for them.
    fn resend(&self, resend: Vec<(usize, Header)>) {
        for (j, h) in resend {
            if let Some(c) = self.conns.get(j) {
                if let Err(e) = c.send(replica_conn::seal(h, &[]), &Bytes::new(), true) {
                    warn!("re-sending a read to replica {}: {e}", c.addr);
                    self.volume.fail_replica(j, &format!("send failed: {e}"));
                }
            }
        }
    }

    /// Runs `job` here, unless this is a reply collector: then on the session's sender
    /// thread. A collector must never wait to send to a replica. A send blocks when the
    /// replica's socket is full, which it stays while the replica is itself blocked
    /// sending replies that only this collector would read (and the frontend's thread,
    /// blocked in a big write to that replica, holds the connection's send lock): both
    /// would wait for ever. The sends made from reply handling are the next pieces of a
    /// long zeroing or trim and reads sent again after a replica was dropped.
    fn off_collector(&self, job: impl FnOnce(&Inner) + Send + 'static) {
        if !ON_COLLECTOR.with(Cell::get) {
            return job(self);
        }
        let mut tx = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (s, r) = mpsc::channel::<SendJob>();
            let me = self.me.clone();
            // The thread holds the session only while it runs a job, so it ends when
            // the session does (its channel closes with it).
            let spawned = std::thread::Builder::new().name("replica-sends".into()).spawn(move || {
                while let Ok(job) = r.recv() {
                    let Some(me) = me.upgrade() else { return };
                    job(&me);
                }
            });
            match spawned {
                Ok(_) => *tx = Some(s),
                Err(e) => {
                    drop(tx);
                    warn!("cannot start a thread for the replica sends of reply handling ({e}): sending from the collector");
                    return job(self);
                }
            }
        }
        let Some(s) = tx.as_ref() else { return };
        if let Err(mpsc::SendError(job)) = s.send(Box::new(job)) {
            drop(tx);
            job(self);
        }
    }

    /// Replicas that have left a request unanswered for longer than `timeout`.
    pub(crate) fn late_replicas(&self, timeout: Duration) -> Vec<usize> {
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        let mut mask = 0u32;
        for p in ops.values() {
            if p.started.elapsed() > timeout {
                mask |= p.waiting;
            }
        }
        (0..self.conns.len()).filter(|&i| mask & bit(i) != 0).collect()
    }
}

impl Handler for Inner {
    fn frame(&self, idx: usize, h: Header, mut payload: Bytes) -> Option<String> {
        if let (Op::WriteShared | Op::ReadShared, Some(Some(pool))) = (h.op, self.pool.get()) {
            // A reply for a region not lent to this replica, or a second one, is a
            // damaged stream: it must not free what another replica or the client
            // still uses.
            if h.op == Op::ReadShared && h.status == 0 {
                // The data stays in the region until the client has it.
                match pool.take(h.id, idx, h.count, &payload) {
                    Ok(data) => payload = data,
                    Err(why) => return Some(format!("bad reply stream: {why}")),
                }
            } else if !pool.release(h.id, idx) {
                // Otherwise the replica is done with the region (it replies after
                // applying the data, or failing to): it may be written again.
                return Some(format!("bad reply stream: {:?} reply for id {}, for which no region was lent to this replica", h.op, h.id));
            }
        }
        self.on_reply(idx, h, payload)
    }

    fn lost(&self, idx: usize, why: Lost) {
        let why = match why {
            Lost::Condemned(reason) => reason,
            // The session is closing: its connections end, no replica failed.
            Lost::Frame(_) if self.closed.load(Ordering::Acquire) => return,
            Lost::Frame(FrameError::Closed) => "connection closed by the replica".to_string(),
            Lost::Frame(e) => format!("bad reply stream: {e}"),
        };
        self.volume.fail_replica(idx, &why);
    }

    fn round_done(&self) {
        self.completer.flush();
    }
}
