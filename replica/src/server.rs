//! The replica side of the data protocol (see `proto` for the wire rules).
//!
//! One thread per engine connection reads a request, applies it to the store and queues
//! the reply; replies are written in one `writev` whenever no further request is already
//! buffered, so a burst of pipelined requests costs one syscall back. Reads and writes
//! go through the page cache and complete inline (microseconds); FLUSH and FUA writes
//! go to a single sync thread that does one `fdatasync` for every flush waiting on it
//! (group commit) and replies to each, out of order with the inline traffic.
//!
//! A read the page cache cannot answer (`preadv2(RWF_NOWAIT)` says it would wait) is
//! handed to the kernel in the connection's own io_uring (`uring`) and answered when a
//! later reap finds it done, or, where io_uring is not allowed, goes to a small pool of
//! reader threads; either way the requests one connection pipelines reach the disk
//! together rather than one at a time, and those replies come out of order too. Order
//! still holds where it matters: a write, zeroing or trim waits for the misses of its
//! connection that overlap it (a read sees no write that came after it), and every
//! other control request waits for all of them.
//!
//! Every connection starts with the handshake of `auth`. Then one engine at a time may
//! use the replica: the first to connect takes the lease, its other connections join
//! it, and a second engine is refused while the first holds connections and was heard
//! from within [`LEASE`] (engines ping every few seconds). When it has gone (its
//! connections closed) or fell silent for longer, another engine may take over; every
//! later request on the old engine's connections is refused with ESTALE, so two
//! engines never write to one replica.

use crate::auth::{self, Key};
use crate::proto::{self, FrameError, Header, Hello, Op, FLAG_FUA, FLAG_REPLY, HEADER_LEN};
use crate::shm::{Attach, Descriptor, Mapping};
use crate::store::Store;
use crate::uring::{Done, Dst, MissRing, Started};
use bytes::{Bytes, BytesMut};
use std::io::{self, BufReader, IoSlice, Write};
use crate::net::{Listener, Stream};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use tracing::{debug, info, warn};

/// At most this many reads wait on the disk at once (the pool's threads, started as
/// misses need them): enough to keep a virtio or NVMe queue busy.
const READERS: usize = 16;

/// Payloads at least this big are sent from their own buffer instead of being copied
/// into the reply batch.
const BIG: usize = 16 * 1024;

pub struct ReplicaServer {
    store: Arc<Store>,
    mode: Mutex<String>,
    sync_tx: Mutex<Sender<SyncJob>>,
    stopping: AtomicBool,
    /// The volume's secret (see `auth`); without one, no proof is asked for.
    key: Option<Arc<Key>>,
    lease: Mutex<Option<Lease>>,
    /// The generation of the current lease: a connection of an older one is fenced.
    lease_gen: AtomicU64,
    /// When the lease holder was last heard from, in ms since `epoch`.
    last_seen: AtomicU64,
    epoch: Instant,
    readers: Readers,
    /// Connections keep their misses in an io_uring (see `uring`) unless this is off.
    rings: AtomicBool,
}

/// How long an engine that holds connections but sends nothing keeps the volume. An
/// engine pings every few seconds; one silent this long is gone or cut off, and
/// another may take over (the old one's connections are then refused every request).
pub const LEASE: Duration = Duration::from_secs(15);

/// How long a new engine waits for the threads of a holder whose connections are all
/// closed by its end (a killed engine) to finish, before it is refused (see `acquire`).
const DEAD_HOLDER_WAIT: Duration = Duration::from_secs(3);

/// One engine at a time: the one whose connections write to this replica.
struct Lease {
    engine: String,
    conns: usize,
    gen: u64,
    /// The holder's connections, to tell a dead holder from a live one (see `acquire`).
    outs: Vec<std::sync::Weak<Out>>,
}

impl Lease {
    /// Whether every connection of the holder is closed by its far end: its process is
    /// gone (killed: the kernel closed its sockets), though the threads serving those
    /// connections here may not have finished yet. Unknown (an in-process engine, no
    /// connection recorded) counts as alive.
    fn holder_gone(&self) -> bool {
        let live: Vec<Arc<Out>> = self.outs.iter().filter_map(|w| w.upgrade()).collect();
        !live.is_empty() && live.iter().all(|o| o.peer_closed())
    }
}

/// What a connection may do, fixed by its handshake.
#[derive(Clone, Copy)]
enum Peer {
    /// An engine holding lease generation `gen`.
    Engine { gen: u64 },
    /// A replica copying a rebuild from this one: read-only rebuild ops.
    Replica,
}

struct SyncJob {
    out: Arc<Out>,
    header: Header,
}

/// A read sent to the pool: the page cache did not hold it.
struct ReadJob {
    out: Arc<Out>,
    pending: Arc<Pending>,
    header: Header,
    /// READ_SHARED: the engine's pool and the offset of the region lent for the data.
    into: Option<(Arc<Mapping>, u64)>,
}

/// The ranges of one connection's reads still in the pool.
///
/// `Pending` and [`Out`] lock with parking_lot, not std: they notify after every burst
/// and pooled read, and parking_lot's notify costs no syscall while nobody waits
/// (std's always makes one).
#[derive(Default)]
struct Pending {
    reads: parking_lot::Mutex<Vec<(u64, u64)>>,
    cv: parking_lot::Condvar,
}

impl Pending {
    fn lock(&self) -> parking_lot::MutexGuard<'_, Vec<(u64, u64)>> {
        self.reads.lock()
    }

    /// Records a read for the pool; waits first while the connection's pooled reads
    /// already ask for [`MAX_QUEUED`] bytes, so a peer that pipelines reads it does not
    /// collect holds no more of the replica's memory than one whose replies are queued.
    fn add(&self, start: u64, end: u64) {
        let mut r = self.lock();
        while r.iter().map(|&(s, e)| (e - s) as usize).sum::<usize>() >= MAX_QUEUED {
            self.cv.wait(&mut r);
        }
        r.push((start, end));
    }

    fn done(&self, start: u64, end: u64) {
        let mut r = self.lock();
        if let Some(i) = r.iter().position(|&x| x == (start, end)) {
            r.swap_remove(i);
        }
        drop(r);
        self.cv.notify_all();
    }

    /// Keeps a connection's order where it matters before `h` is applied: a write,
    /// zeroing or trim waits for the pooled reads it overlaps, a control request for all.
    fn before(&self, h: &Header) {
        if let Some(range) = Self::waits_for(h) {
            self.wait(range)
        }
    }

    /// What `h` must wait for: nothing, the reads overlapping a range, or all (`None`).
    fn waits_for(h: &Header) -> Option<Option<(u64, u64)>> {
        match h.op {
            Op::Read | Op::ReadShared | Op::Flush | Op::Ping => None,
            Op::Write | Op::WriteShared | Op::WriteZeroes | Op::Trim => Some(Some((h.offset, h.offset.saturating_add(h.count as u64)))),
            _ => Some(None),
        }
    }

    /// Waits until no pooled read overlaps `[start, end)` (`None`: until none is left).
    fn wait(&self, range: Option<(u64, u64)>) {
        let mut r = self.lock();
        while r.iter().any(|&(s, e)| range.is_none_or(|(a, b)| s < b && a < e)) {
            self.cv.wait(&mut r);
        }
    }
}

/// The pool of readers (see the module doc).
struct Readers {
    tx: crossbeam_channel::Sender<ReadJob>,
    rx: crossbeam_channel::Receiver<ReadJob>,
    started: AtomicUsize,
    idle: AtomicUsize,
}

/// Most reply bytes one connection may have queued before its reader stops taking
/// requests: a peer that stops reading its replies holds at most this much (plus one
/// request's reply) of the replica's memory, and stalls only itself.
const MAX_QUEUED: usize = 64 << 20;

/// The sending half of one connection. Replies are queued under a short lock and sent
/// by whichever thread finds no one else sending: the connection's own thread (it may
/// block on its socket: it stalls only its own peer), or the sync thread, which never
/// blocks on a socket. What the sync thread cannot send at once goes to a helper thread
/// of this connection, made the first time it is needed.
struct Out {
    /// `None` for an engine in this process (see [`LocalConn`]): replies go to `sink`.
    stream: Option<Stream>,
    sink: Option<Sink>,
    st: parking_lot::Mutex<OutState>,
    cv: parking_lot::Condvar,
}

/// Where an in-process engine takes its replies (see [`LocalConn`]).
pub type Sink = Box<dyn Fn(Header, Bytes) + Send + Sync>;

#[derive(Default)]
struct OutState {
    small: BytesMut,
    segs: Vec<Bytes>,
    /// Bytes in `small` and `segs`.
    queued: usize,
    /// A thread is sending (outside the lock); frames queued meanwhile are its to send.
    writing: bool,
    /// Left unsent by the sync thread: the helper's to send.
    handoff: bool,
    helper: bool,
    broken: bool,
    closed: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum SendMode {
    /// May wait for the peer to read.
    Blocking,
    /// Sends what the socket takes now and hands the rest to the helper.
    NoWait,
}

impl Out {
    fn new(stream: Stream) -> Arc<Out> {
        Arc::new(Out { stream: Some(stream), sink: None, st: parking_lot::Mutex::new(OutState::default()), cv: parking_lot::Condvar::new() })
    }

    fn local(sink: Sink) -> Arc<Out> {
        Arc::new(Out { stream: None, sink: Some(sink), st: parking_lot::Mutex::new(OutState::default()), cv: parking_lot::Condvar::new() })
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, OutState> {
        self.st.lock()
    }

    fn queue(&self, h: Header, payload: Bytes) {
        if let Some(sink) = &self.sink {
            // In process: no checksum (nothing in between to damage it), no batching,
            // and no lock held while the engine takes it.
            if !self.lock().closed {
                sink(h, payload);
            }
            return;
        }
        let mut p = self.lock();
        let mut h = h;
        h.payload_len = payload.len() as u32;
        h.crc = proto::checksum(&payload);
        p.queued += HEADER_LEN + payload.len();
        p.small.extend_from_slice(&h.encode());
        if payload.len() >= BIG {
            let head = p.small.split().freeze();
            p.segs.push(head);
            p.segs.push(payload);
        } else {
            p.small.extend_from_slice(&payload);
        }
    }

    /// Sends what is queued, unless another thread is sending it already.
    fn send(self: &Arc<Self>, how: SendMode) -> io::Result<()> {
        let Some(stream) = &self.stream else { return Ok(()) };
        let mut st = self.lock();
        loop {
            if st.broken {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection failed while sending replies"));
            }
            if st.writing {
                return Ok(());
            }
            if !st.small.is_empty() {
                let rest = st.small.split().freeze();
                st.segs.push(rest);
            }
            if st.segs.is_empty() {
                return Ok(());
            }
            let mut batch = std::mem::take(&mut st.segs);
            let total: usize = batch.iter().map(|b| b.len()).sum();
            st.writing = true;
            drop(st);
            let r = match how {
                SendMode::Blocking => write_segments(stream, &mut batch, false),
                SendMode::NoWait => write_segments(stream, &mut batch, true),
            };
            st = self.lock();
            st.writing = false;
            let left: usize = batch.iter().map(|b| b.len()).sum();
            st.queued -= total - left;
            self.cv.notify_all();
            if let Err(e) = r {
                st.broken = true;
                return Err(e);
            }
            if left > 0 {
                // Frames queued meanwhile come after what is left of ours.
                batch.append(&mut st.segs);
                st.segs = batch;
                st.handoff = true;
                if !st.helper {
                    st.helper = true;
                    let me = self.clone();
                    let r = std::thread::Builder::new().name("replica-send".into()).spawn(move || me.helper());
                    if let Err(e) = r {
                        st.broken = true;
                        return Err(e);
                    }
                }
                return Ok(());
            }
        }
    }

    /// Sends, blocking, what the sync thread had to leave, until the connection ends.
    fn helper(self: Arc<Self>) {
        loop {
            {
                let mut st = self.lock();
                while !(st.handoff && !st.writing) && !st.closed && !st.broken {
                    self.cv.wait(&mut st);
                }
                if st.closed || st.broken {
                    return;
                }
                st.handoff = false;
            }
            if let Err(e) = self.send(SendMode::Blocking) {
                debug!("cannot send replies: {e}");
                return;
            }
        }
    }

    /// Waits while more than [`MAX_QUEUED`] bytes of replies wait for the peer.
    fn wait_room(self: &Arc<Self>) -> io::Result<()> {
        let mut st = self.lock();
        while st.queued > MAX_QUEUED && !st.broken {
            if !st.writing {
                drop(st);
                self.send(SendMode::Blocking)?;
                st = self.lock();
                continue;
            }
            self.cv.wait(&mut st);
        }
        Ok(())
    }

    /// Whether the far end closed the connection (a poll that waits for nothing).
    fn peer_closed(&self) -> bool {
        let Some(s) = &self.stream else { return false };
        let mut p = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: poll on one pollfd we own, with a zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Writes `segs`, consuming what was sent. With `no_wait`, stops (Ok) when the socket
/// would block, leaving the rest in `segs`.
fn write_segments(s: &Stream, segs: &mut Vec<Bytes>, no_wait: bool) -> io::Result<()> {
    let mut i = 0;
    let r = loop {
        if i >= segs.len() {
            break Ok(());
        }
        let iov: Vec<IoSlice> = segs[i..].iter().take(64).map(|b| IoSlice::new(b)).collect();
        let n = if no_wait { crate::net::sendmsg(s.as_raw_fd(), &iov, libc::MSG_DONTWAIT) } else { (&*s).write_vectored(&iov) };
        let mut n = match n {
            Ok(0) => break Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed while writing replies")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if no_wait && e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) => break Err(e),
        };
        while n > 0 && i < segs.len() {
            if n >= segs[i].len() {
                n -= segs[i].len();
                i += 1;
            } else {
                let _ = segs[i].split_to(n);
                n = 0;
            }
        }
    };
    segs.drain(..i);
    r
}

fn errno_of(e: &io::Error) -> u32 {
    if let Some(n) = e.raw_os_error() {
        return n as u32;
    }
    match e.kind() {
        io::ErrorKind::InvalidInput => libc::EINVAL as u32,
        io::ErrorKind::StorageFull => libc::ENOSPC as u32,
        _ => libc::EIO as u32,
    }
}

/// A READ_SHARED reply's payload: where the data is, and its CRC.
fn shared_reply(offset: u64, data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&Descriptor { offset, crc: proto::checksum(data) }.encode())
}

/// Queues the reply to a read the page cache missed.
fn reply_read(out: &Out, h: Header, res: io::Result<Bytes>) {
    let mut r = reply_of(&h);
    match res {
        Ok(data) => out.queue(r, data),
        Err(e) => {
            debug!(offset = h.offset, count = h.count, "read failed: {e}");
            r.status = errno_of(&e);
            out.queue(r, Bytes::from(e.to_string()));
        }
    }
}

fn reply_of(h: &Header) -> Header {
    Header { op: h.op, flags: FLAG_REPLY, id: h.id, offset: h.offset, count: h.count, payload_len: 0, status: 0, crc: 0 }
}

impl ReplicaServer {
    /// A server for `store`; with `key`, every client must prove the volume's secret.
    pub fn new(store: Arc<Store>, key: Option<Arc<Key>>) -> Arc<ReplicaServer> {
        let (tx, rx) = channel();
        let srv = Arc::new(ReplicaServer {
            store,
            mode: Mutex::new("RW".to_string()),
            sync_tx: Mutex::new(tx),
            stopping: AtomicBool::new(false),
            key,
            lease: Mutex::new(None),
            lease_gen: AtomicU64::new(0),
            last_seen: AtomicU64::new(0),
            epoch: Instant::now(),
            readers: {
                let (tx, rx) = crossbeam_channel::unbounded();
                Readers { tx, rx, started: AtomicUsize::new(0), idle: AtomicUsize::new(0) }
            },
            rings: AtomicBool::new(true),
        });
        let s2 = srv.clone();
        std::thread::Builder::new()
            .name("replica-sync".into())
            .spawn(move || s2.sync_loop(rx))
            .map(|_| ())
            .unwrap_or_else(|e| warn!("cannot start the sync thread: {e}"));
        srv
    }

    /// Sends the misses of connections made from now on to the reader pool instead of an
    /// io_uring of their own (`replica serve --no-io-uring`).
    pub fn read_misses_with_threads(&self) {
        self.rings.store(false, Ordering::Relaxed);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops applying I/O, flushes, and records a clean close.
    pub fn shutdown(&self) -> Result<(), crate::store::StoreError> {
        self.stopping.store(true, Ordering::Release);
        self.store.close()
    }

    /// Accepts engine connections until the process ends.
    pub fn serve(self: &Arc<Self>, listener: Listener) {
        loop {
            match listener.accept() {
                Ok(stream) => {
                    let srv = self.clone();
                    let peer = stream.peer();
                    let r = std::thread::Builder::new().name("replica-conn".into()).spawn(move || {
                        match srv.connection(stream, &peer) {
                            Ok(()) | Err(FrameError::Closed) => info!(%peer, "engine connection closed"),
                            Err(e) => warn!(%peer, "dropping engine connection: {e}"),
                        }
                    });
                    if let Err(e) = r {
                        warn!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    fn connection(self: &Arc<Self>, stream: Stream, peer: &str) -> Result<(), FrameError> {
        let out = Out::new(stream.try_clone()?);
        let mut rd = BufReader::with_capacity(256 * 1024, stream);
        let result = self.conversation(&mut rd, &out, peer);
        out.close();
        result
    }

    fn conversation(self: &Arc<Self>, rd: &mut BufReader<Stream>, out: &Arc<Out>, peer: &str) -> Result<(), FrameError> {
        let Some(who) = self.handshake(rd, out, peer)? else { return Ok(()) };
        let result = self.serve_requests(rd, out, who);
        if let Peer::Engine { gen } = who {
            self.release(gen);
        }
        result
    }

    /// The challenge, the client's proof and the lease (see `auth`). `None`: refused.
    fn handshake(&self, rd: &mut BufReader<Stream>, out: &Arc<Out>, peer: &str) -> Result<Option<Peer>, FrameError> {
        let c = auth::challenge(self.key.as_deref())?;
        let mut ch = Header::request(Op::Hello, 0, 0, 0);
        ch.flags = FLAG_REPLY;
        out.queue(ch, Bytes::from(serde_json::to_vec(&c).map_err(io::Error::other)?));
        out.send(SendMode::Blocking)?;
        // A client that connects and says nothing is not waited for.
        rd.get_ref().set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
        let (h, payload) = proto::read_frame_buffered(rd)?;
        rd.get_ref().set_read_timeout(None)?;
        if h.op != Op::Hello {
            warn!(%peer, "first request was {:?}, not Hello", h.op);
            return Err(FrameError::Io(io::Error::new(io::ErrorKind::InvalidData, "no Hello")));
        }
        let refuse = |errno: i32, why: String| -> Result<Option<Peer>, FrameError> {
            warn!(%peer, "refusing a client: {why}");
            let mut r = reply_of(&h);
            r.status = errno as u32;
            out.queue(r, Bytes::from(why));
            out.send(SendMode::Blocking)?;
            Ok(None)
        };
        let hello: Hello = match serde_json::from_slice(&payload) {
            Ok(v) => v,
            Err(e) => return refuse(libc::EINVAL, format!("malformed Hello: {e}")),
        };
        if let Some(k) = &self.key {
            if !auth::check_hello(k, &c, &hello) {
                return refuse(libc::EACCES, "authentication failed: the Hello does not prove this volume's secret".into());
            }
        }
        if hello.volume != self.store.volume() || hello.size != self.store.size() {
            return refuse(
                libc::EINVAL,
                format!(
                    "this replica serves volume {:?} of {} bytes; the client asked for {:?} of {} bytes",
                    self.store.volume(),
                    self.store.size(),
                    hello.volume,
                    hello.size
                ),
            );
        }
        let who = match hello.role.as_str() {
            auth::ROLE_PEER => Peer::Replica,
            auth::ROLE_ENGINE | "" => match self.acquire(&hello.engine, peer, out) {
                Ok(gen) => Peer::Engine { gen },
                Err(why) => return refuse(libc::EBUSY, why),
            },
            r => return refuse(libc::EINVAL, format!("unknown role {r:?}")),
        };
        info!(%peer, volume = %hello.volume, role = %hello.role, engine = %hello.engine, "client connected");
        let mut info = self.info();
        if let Some(k) = &self.key {
            info.mac = auth::welcome_mac(k, &c, &hello);
        }
        out.queue(reply_of(&h), Bytes::from(serde_json::to_vec(&info).map_err(io::Error::other)?));
        out.send(SendMode::Blocking)?;
        Ok(Some(who))
    }

    fn serve_requests(self: &Arc<Self>, rd: &mut BufReader<Stream>, out: &Arc<Out>, who: Peer) -> Result<(), FrameError> {
        let mut buf = BytesMut::new();
        let pending = Arc::new(Pending::default());
        let result = self.requests(rd, out, who, &pending, &mut buf);
        // The pool's replies for this connection are sent (or dropped) before it ends.
        pending.wait(None);
        result
    }

    fn requests(
        self: &Arc<Self>,
        rd: &mut BufReader<Stream>,
        out: &Arc<Out>,
        who: Peer,
        pending: &Arc<Pending>,
        buf: &mut BytesMut,
    ) -> Result<(), FrameError> {
        // The engine's payload pool, once it has offered one (see `shm`).
        let mut shared: Option<Arc<Mapping>> = None;
        let mut ring = match who {
            Peer::Engine { .. } => self.miss_ring(rd.get_ref()),
            Peer::Replica => None,
        };
        loop {
            if let Some(r) = ring.as_mut() {
                // Misses in flight finish only when this thread reaps them: it waits for
                // them and for its socket together, sending replies as they come.
                while r.busy() && rd.buffer().len() < HEADER_LEN {
                    let readable = r.reap(true, true).map_err(FrameError::Io)?;
                    self.finish_misses(out, r);
                    out.send(SendMode::Blocking)?;
                    if readable {
                        break;
                    }
                }
                while !r.has_room() {
                    r.reap(true, false).map_err(FrameError::Io)?;
                    self.finish_misses(out, r);
                }
            }
            let (h, mut payload) = proto::read_frame_buffered(rd)?;
            pending.before(&h);
            if let (Some(r), Some(range)) = (ring.as_mut(), Pending::waits_for(&h)) {
                // The same order as `pending.before` keeps for the pool's reads.
                while r.overlaps(range) {
                    r.reap(true, false).map_err(FrameError::Io)?;
                    self.finish_misses(out, r);
                }
            }
            match who {
                Peer::Engine { gen } => {
                    if self.lease_gen.load(Ordering::Acquire) != gen {
                        // Another engine holds the volume now: this one must not write.
                        let mut r = reply_of(&h);
                        r.status = libc::ESTALE as u32;
                        out.queue(r, Bytes::from_static(b"another engine took over this replica; this engine's lease is gone"));
                        out.send(SendMode::Blocking)?;
                        return Err(FrameError::Io(io::Error::other("request from an engine whose lease is gone")));
                    }
                    self.last_seen.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
                }
                Peer::Replica => {
                    if !matches!(h.op, Op::ChainFiles | Op::FileExtents | Op::FileRead | Op::FileHash | Op::Info | Op::Ping) {
                        let mut r = reply_of(&h);
                        r.status = libc::EPERM as u32;
                        out.queue(r, Bytes::from(format!("{:?} is not for a rebuild peer", h.op)));
                        out.send(SendMode::Blocking)?;
                        continue;
                    }
                }
            }
            match h.op {
                Op::ReadShared => {
                    let m = shared.as_ref().ok_or_else(|| FrameError::Io(io::Error::other("READ_SHARED before SHARE_MEMORY")))?;
                    self.read_shared(out, pending, ring.as_mut(), h, m, &payload)
                        .map_err(|e| FrameError::Io(io::Error::other(format!("id {}: {e}", h.id))))?;
                    if rd.buffer().len() < HEADER_LEN {
                        self.burst_end(out, ring.as_mut())?;
                    }
                    out.wait_room()?;
                    continue;
                }
                Op::ShareMemory => {
                    let mut r = reply_of(&h);
                    match self.share_memory(&payload, shared.is_some()) {
                        Ok(m) => {
                            shared = Some(m);
                            out.queue(r, Bytes::new());
                        }
                        Err(e) => {
                            // The reason stays here: it may name another process's
                            // files, and an engine may be on another host.
                            warn!("refused the engine's shared memory: {e}");
                            r.status = errno_of(&e);
                            out.queue(r, Bytes::from_static(b"the replica cannot use that shared memory (its log says why)"));
                        }
                    }
                    out.send(SendMode::Blocking)?;
                    continue;
                }
                Op::WriteShared => {
                    // The data is not where the descriptor says, or nothing was
                    // shared: as with a bad checksum, nothing of this stream is trusted.
                    let m = shared.as_ref().ok_or_else(|| FrameError::Io(io::Error::other("WRITE_SHARED before SHARE_MEMORY")))?;
                    payload = m.payload(h.count, &payload).map_err(|e| FrameError::Io(io::Error::other(format!("id {}: {e}", h.id))))?;
                }
                _ => {}
            }
            self.handle(out, pending, ring.as_mut(), h, payload, buf);
            if rd.buffer().len() < HEADER_LEN {
                self.burst_end(out, ring.as_mut())?;
            }
            out.wait_room()?;
        }
    }

    /// Takes or joins the engine lease for `engine` (see [`LEASE`]).
    /// An engine killed a moment ago still holds the lease until the threads serving
    /// its connections here see them closed; a new engine asking meanwhile was refused
    /// for nothing (a restart right after a crash failed that way under load). So when
    /// the far end closed every one of the holder's connections, the holder is gone,
    /// and the new engine waits (up to [`DEAD_HOLDER_WAIT`]) for those threads to finish
    /// instead of being refused. It still takes over only once they have: a request the
    /// dead engine sent is applied before the new engine's first, never after.
    fn acquire(&self, engine: &str, peer: &str, out: &Arc<Out>) -> Result<u64, String> {
        let waited = std::time::Instant::now();
        let mut l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = self.epoch.elapsed().as_millis() as u64;
            let idle = Duration::from_millis(now.saturating_sub(self.last_seen.load(Ordering::Acquire)));
            match l.as_mut() {
                Some(cur) if cur.engine == engine => {
                    cur.conns += 1;
                    cur.outs.retain(|w| w.strong_count() > 0);
                    cur.outs.push(Arc::downgrade(out));
                    return Ok(cur.gen);
                }
                Some(cur) if cur.conns > 0 && idle < LEASE => {
                    if cur.holder_gone() && waited.elapsed() < DEAD_HOLDER_WAIT {
                        drop(l);
                        std::thread::sleep(Duration::from_millis(5));
                        l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    return Err(format!(
                        "another engine ({}) serves this replica (last request {} ms ago); a second engine is refused",
                        cur.engine,
                        idle.as_millis()
                    ));
                }
                Some(cur) => {
                    warn!(%peer, new = engine, old = %cur.engine, open = cur.conns, idle_ms = idle.as_millis() as u64, "an engine takes over the replica");
                }
                None => {}
            }
            let gen = self.lease_gen.load(Ordering::Acquire) + 1;
            *l = Some(Lease { engine: engine.to_string(), conns: 1, gen, outs: vec![Arc::downgrade(out)] });
            self.lease_gen.store(gen, Ordering::Release);
            self.last_seen.store(now, Ordering::Release);
            return Ok(gen);
        }
    }

    fn release(&self, gen: u64) {
        let mut l = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cur) = l.as_mut().filter(|c| c.gen == gen) {
            cur.conns = cur.conns.saturating_sub(1);
        }
    }

    fn info(&self) -> crate::proto::ReplicaInfo {
        let mode = self.mode.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut info = self.store.info(&mode);
        info.shared_writes = true;
        info
    }

    /// A READ_SHARED: the data goes into the region of the engine's pool the request
    /// names, the reply says where and with what CRC. Err (a region outside the pool)
    /// ends the connection.
    fn read_shared(
        self: &Arc<Self>,
        out: &Arc<Out>,
        pending: &Arc<Pending>,
        ring: Option<&mut MissRing>,
        h: Header,
        m: &Arc<Mapping>,
        desc: &[u8],
    ) -> Result<(), String> {
        if h.count > proto::MAX_IO {
            return Err(format!("READ_SHARED of {} bytes (at most {})", h.count, proto::MAX_IO));
        }
        let (off, dst) = m.region(h.count, desc)?;
        let mut r = reply_of(&h);
        if self.stopping.load(Ordering::Acquire) {
            r.status = libc::ESHUTDOWN as u32;
            out.queue(r, Bytes::new());
            return Ok(());
        }
        match self.store.read_cached_to(h.offset, dst) {
            Ok(()) => out.queue(r, shared_reply(off, dst)),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                r.status = errno_of(&e);
                out.queue(r, Bytes::from(e.to_string()));
            }
            // Not all cached: the disk is waited for, as for a READ.
            Err(_) => self.miss(out, pending, ring, h, Some((m.clone(), off))),
        }
        Ok(())
    }

    /// Maps the pool a SHARE_MEMORY names (one per connection).
    fn share_memory(&self, payload: &[u8], already: bool) -> io::Result<Arc<Mapping>> {
        if already {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "this connection already shares memory"));
        }
        let a: Attach = serde_json::from_slice(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("malformed SHARE_MEMORY: {e}")))?;
        let m = Mapping::open(&a)?;
        info!(pid = a.pid, bytes = a.len, "the engine shares memory for write payloads on this connection");
        Ok(m)
    }

    fn info_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.info()).unwrap_or_default()
    }

    fn handle(self: &Arc<Self>, out: &Arc<Out>, pending: &Arc<Pending>, ring: Option<&mut MissRing>, h: Header, payload: Bytes, buf: &mut BytesMut) {
        let mut r = reply_of(&h);
        let stopping = self.stopping.load(Ordering::Acquire);
        let io_op = matches!(h.op, Op::Read | Op::Write | Op::WriteShared | Op::WriteZeroes | Op::Trim | Op::Flush);
        if stopping && io_op {
            r.status = libc::ESHUTDOWN as u32;
            out.queue(r, Bytes::new());
            return;
        }
        let res: io::Result<Bytes> = match h.op {
            Op::Read => {
                if h.count > proto::MAX_IO {
                    Err(io::Error::new(io::ErrorKind::InvalidInput, "read too large"))
                } else {
                    buf.reserve(h.count as usize);
                    match self.store.read_cached(h.offset, h.count as usize, buf) {
                        Ok(()) => Ok(buf.split().freeze()),
                        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(e),
                        // Not all cached (or the fast path failed): read where the disk
                        // can be waited for, which also gives the real answer.
                        Err(_) => return self.miss(out, pending, ring, h, None),
                    }
                }
            }
            // WRITE_SHARED's payload was fetched from the pool by `requests`.
            Op::Write | Op::WriteShared => {
                if payload.len() != h.count as usize {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("write count {} but payload {}", h.count, payload.len()),
                    ))
                } else {
                    match self.store.write(h.offset, &payload) {
                        Ok(()) if h.flags & FLAG_FUA != 0 => return self.to_sync(out, h),
                        r => r.map(|_| Bytes::new()),
                    }
                }
            }
            Op::WriteZeroes | Op::Trim => {
                let r = if h.op == Op::WriteZeroes {
                    self.store.write_zeroes(h.offset, h.count as u64)
                } else {
                    self.store.trim(h.offset, h.count as u64)
                };
                match r {
                    Ok(()) if h.flags & FLAG_FUA != 0 => return self.to_sync(out, h),
                    r => r.map(|_| Bytes::new()),
                }
            }
            Op::Flush => return self.to_sync(out, h),
            Op::BlockStatus => self
                .store
                .block_status(h.offset, h.count as u64)
                .map(|e| Bytes::from(proto::encode_extents(&e))),
            Op::Ping | Op::Hello => Ok(Bytes::new()),
            Op::Info => Ok(Bytes::from(self.info_json())),
            Op::Revision => Ok(Bytes::from(self.store.revision().to_string())),
            Op::SetMode => match std::str::from_utf8(&payload) {
                Ok(m @ ("RW" | "WO")) => {
                    *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = m.to_string();
                    Ok(Bytes::new())
                }
                _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "mode must be RW or WO")),
            },
            Op::Snapshot | Op::SnapshotRemove | Op::SnapshotRevert => self.snapshot_op(h.op, &payload),
            Op::SnapshotList => self
                .store
                .list_snapshots()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|l| serde_json::to_vec(&l).map_err(io::Error::other))
                .map(Bytes::from),
            Op::ChainFiles => self
                .store
                .chain_files()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|l| serde_json::to_vec(&l).map_err(io::Error::other))
                .map(Bytes::from),
            Op::FileExtents | Op::FileRead | Op::FileHash => self.file_op(&h, &payload),
            Op::SnapshotRead | Op::SnapshotRanges => crate::export::serve(&self.store, &h, &payload),
            Op::RebuildBegin => serde_json::from_slice::<crate::rebuild::BeginRebuild>(&payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("malformed RebuildBegin: {e}")))
                .and_then(|b| self.store.begin_rebuild(&b).map_err(|e| io::Error::other(e.to_string())))
                .map(|_| {
                    *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = "WO".to_string();
                    Bytes::new()
                }),
            Op::RebuildSync => serde_json::from_slice::<crate::rebuild::SyncRequest>(&payload)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("malformed RebuildSync: {e}")))
                .and_then(|r| self.store.sync_from(&r, self.key.clone()).map_err(|e| io::Error::other(e.to_string())))
                .and_then(|p| {
                    *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = "RW".to_string();
                    serde_json::to_vec(&p).map_err(io::Error::other)
                })
                .map(Bytes::from),
            Op::ShareMemory | Op::ReadShared => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{:?} is for a data connection over a socket", h.op)))
            }
            Op::Settle => {
                self.store.settle();
                Ok(Bytes::new())
            }
            Op::Close => {
                self.store
                    .close()
                    .map(|_| Bytes::new())
                    .map_err(|e| io::Error::other(e.to_string()))
            }
        };
        match res {
            Ok(p) => out.queue(r, p),
            Err(e) => {
                debug!(op = ?h.op, offset = h.offset, count = h.count, "request failed: {e}");
                if h.op != Op::Read {
                    warn!(op = ?h.op, offset = h.offset, count = h.count, "request failed: {e}");
                }
                r.status = errno_of(&e);
                out.queue(r, Bytes::from(e.to_string()));
            }
        }
    }

    fn snapshot_op(&self, op: Op, payload: &[u8]) -> io::Result<Bytes> {
        let req: proto::SnapshotRequest = serde_json::from_slice(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("malformed {op:?} request: {e}")))?;
        let created = if req.created.is_empty() { crate::meta::now_rfc3339() } else { req.created.clone() };
        let r = match op {
            Op::Snapshot if req.prepare => self.store.prepare_snapshot(&req.name, req.user_created, &created, req.labels.clone()).map(|_| String::new()),
            Op::Snapshot => self.store.snapshot(&req.name, req.user_created, &created, req.labels.clone()).map(|_| String::new()),
            Op::SnapshotRemove => self.store.remove_snapshot(&req.name),
            _ => self.store.revert(&req.name, &created).map(|_| String::new()),
        };
        r.map(Bytes::from).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    fn file_op(&self, h: &Header, payload: &[u8]) -> io::Result<Bytes> {
        let r: crate::rebuild::FileRequest = serde_json::from_slice(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("malformed {:?} request: {e}", h.op)))?;
        match h.op {
            Op::FileExtents => {
                // The header's offset says where the page starts, its count how many at most.
                let max = if h.count == 0 { usize::MAX } else { h.count as usize };
                let page = self.store.file_extents(&r.file, h.offset, max)?;
                serde_json::to_vec(&page).map(Bytes::from).map_err(io::Error::other)
            }
            Op::FileRead => {
                crate::fault::point("rebuild:file-read");
                self.store.read_file(&r.file, h.offset, h.count as usize).map(Bytes::from)
            }
            _ => self.store.hash_file(&r.file, h.offset, h.count as usize).map(Bytes::from),
        }
    }

    /// A read the page cache could not answer: to the connection's ring when it has one
    /// (see `uring`), to the reader pool otherwise.
    fn miss(self: &Arc<Self>, out: &Arc<Out>, pending: &Arc<Pending>, ring: Option<&mut MissRing>, h: Header, into: Option<(Arc<Mapping>, u64)>) {
        let Some(r) = ring else { return self.to_reader(out, pending, h, into) };
        let dst = match into {
            Some((m, off)) => Dst::Shared(m, off),
            None => Dst::Owned(BytesMut::new()),
        };
        match r.start(&self.store, h, dst) {
            Started::InFlight => {}
            Started::Now(d) => self.finish_miss(out, d),
            Started::TooBig(h, dst) => {
                let into = match dst {
                    Dst::Shared(m, off) => Some((m, off)),
                    Dst::Owned(_) => None,
                };
                self.to_reader(out, pending, h, into)
            }
        }
    }

    /// The connection's ring for misses, or `None` (the pool serves) where io_uring is
    /// not allowed; said once per process.
    fn miss_ring(&self, sock: &Stream) -> Option<MissRing> {
        if !self.rings.load(Ordering::Relaxed) {
            return None;
        }
        static SAID: AtomicBool = AtomicBool::new(false);
        match MissRing::new(sock) {
            Ok(r) => Some(r),
            Err(e) => {
                if !SAID.swap(true, Ordering::Relaxed) {
                    warn!("io_uring is not available ({e}); reads the page cache misses go to a pool of reader threads");
                }
                None
            }
        }
    }

    /// The end of a burst of requests: what the ring finished joins the replies, and all
    /// of them go in one send.
    fn burst_end(&self, out: &Arc<Out>, ring: Option<&mut MissRing>) -> Result<(), FrameError> {
        if let Some(r) = ring {
            r.reap(false, false).map_err(FrameError::Io)?;
            self.finish_misses(out, r);
        }
        out.send(SendMode::Blocking)?;
        Ok(())
    }

    fn finish_misses(&self, out: &Out, r: &mut MissRing) {
        for d in r.take() {
            self.finish_miss(out, d);
        }
    }

    /// Answers a miss the ring finished; one it could not read whole is read again here,
    /// the blocking way, for the real answer.
    fn finish_miss(&self, out: &Out, mut d: Done) {
        let h = d.header;
        d.retry |= self.store.punched_since(d.planned);
        let res = match d.dst {
            Dst::Shared(m, off) => m
                .region(h.count, &Descriptor { offset: off, crc: 0 }.encode())
                .map_err(io::Error::other)
                .and_then(|(off, dst)| {
                    let read = if d.retry { self.store.read_to(h.offset, dst) } else { Ok(()) };
                    read.map(|()| shared_reply(off, dst))
                }),
            Dst::Owned(mut b) if d.retry => self.store.read_into(h.offset, h.count as usize, &mut b).map(|()| b.freeze()),
            Dst::Owned(b) => Ok(b.freeze()),
        };
        reply_read(out, h, res);
    }

    /// Sends a read to the pool, starting another reader when none is idle.
    fn to_reader(self: &Arc<Self>, out: &Arc<Out>, pending: &Arc<Pending>, header: Header, into: Option<(Arc<Mapping>, u64)>) {
        let end = header.offset.saturating_add(header.count as u64);
        pending.add(header.offset, end);
        let rd = &self.readers;
        if rd.idle.load(Ordering::Acquire) == 0 && rd.started.load(Ordering::Acquire) < READERS {
            rd.started.fetch_add(1, Ordering::AcqRel);
            let me = self.clone();
            if let Err(e) = std::thread::Builder::new().name("replica-read".into()).spawn(move || me.reader()) {
                rd.started.fetch_sub(1, Ordering::AcqRel);
                warn!("cannot start a reader thread: {e}");
            }
        }
        if rd.started.load(Ordering::Acquire) == 0 {
            // No reader at all: read here rather than leave the request unanswered.
            return self.read_job(ReadJob { out: out.clone(), pending: pending.clone(), header, into }, &mut BytesMut::new());
        }
        // The pool's receiver lives as long as the server: this cannot fail.
        let _ = rd.tx.send(ReadJob { out: out.clone(), pending: pending.clone(), header, into });
    }

    fn reader(&self) {
        let mut buf = BytesMut::new();
        loop {
            self.readers.idle.fetch_add(1, Ordering::AcqRel);
            let job = self.readers.rx.recv();
            self.readers.idle.fetch_sub(1, Ordering::AcqRel);
            let Ok(job) = job else { return };
            self.read_job(job, &mut buf);
        }
    }

    fn read_job(&self, job: ReadJob, buf: &mut BytesMut) {
        let h = job.header;
        let res = match &job.into {
            Some((m, off)) => m
                .region(h.count, &Descriptor { offset: *off, crc: 0 }.encode())
                .map_err(io::Error::other)
                .and_then(|(off, dst)| self.store.read_to(h.offset, dst).map(|()| shared_reply(off, dst))),
            None => {
                buf.reserve(h.count as usize);
                self.store.read_into(h.offset, h.count as usize, buf).map(|()| buf.split().freeze())
            }
        };
        reply_read(&job.out, h, res);
        job.pending.done(h.offset, h.offset.saturating_add(h.count as u64));
        // Never waits on a peer, as the sync thread: a slow one must not hold a reader.
        if let Err(e) = job.out.send(SendMode::NoWait) {
            debug!("cannot send read replies: {e}");
        }
    }

    fn to_sync(&self, out: &Arc<Out>, header: Header) {
        let tx = self.sync_tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.send(SyncJob { out: out.clone(), header }).is_err() {
            let mut r = reply_of(&header);
            r.status = libc::EIO as u32;
            out.queue(r, Bytes::from_static(b"sync thread is gone"));
        }
    }

    fn sync_loop(&self, rx: Receiver<SyncJob>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while let Ok(j) = rx.try_recv() {
                jobs.push(j);
            }
            let res = self.store.flush();
            if let Err(e) = &res {
                warn!("flush failed: {e}");
            }
            let mut outs: Vec<Arc<Out>> = Vec::new();
            for j in jobs {
                let mut r = reply_of(&j.header);
                let payload = match &res {
                    Ok(()) => Bytes::new(),
                    Err(e) => {
                        r.status = errno_of(e);
                        Bytes::from(e.to_string())
                    }
                };
                j.out.queue(r, payload);
                if !outs.iter().any(|o| Arc::ptr_eq(o, &j.out)) {
                    outs.push(j.out);
                }
            }
            // Never waits on a peer: one that does not read must not stall the others.
            for o in outs {
                if let Err(e) = o.send(SendMode::NoWait) {
                    debug!("cannot send flush replies: {e}");
                }
            }
        }
    }
}

/// An engine in this process using the replica without a socket (`engine serve
/// --embed-replica`): the replica on the engine's own host at the cost of a function
/// call instead of two hand-offs and two socket copies per request. Everything else is
/// as for a connection: the handshake's checks and the engine lease (its fencing
/// included), the order kept against pooled reads, FLUSH and FUA through the sync
/// thread's group commit, pooled reads for what the page cache lacks. Replies reach the
/// sink: at once, on the caller's thread, for what completes inline; later, from the
/// sync thread or a reader, for the rest. Frames carry no checksum here: they never
/// leave the process.
pub struct LocalConn {
    srv: Arc<ReplicaServer>,
    out: Arc<Out>,
    pending: Arc<Pending>,
    gen: u64,
    buf: Mutex<BytesMut>,
}

impl ReplicaServer {
    /// Joins (or takes) the engine lease for `engine`, as a connection's handshake does.
    pub fn connect_local(self: &Arc<Self>, volume: &str, size: u64, engine: &str, sink: Sink) -> Result<LocalConn, String> {
        if volume != self.store.volume() || size != self.store.size() {
            return Err(format!(
                "this replica serves volume {:?} of {} bytes; the engine asked for {volume:?} of {size} bytes",
                self.store.volume(),
                self.store.size()
            ));
        }
        let out = Out::local(sink);
        let gen = self.acquire(engine, "in-process", &out)?;
        Ok(LocalConn { srv: self.clone(), out, pending: Arc::new(Pending::default()), gen, buf: Mutex::new(BytesMut::new()) })
    }
}

impl LocalConn {
    /// Applies one request (see the type's doc for where its reply goes).
    pub fn request(&self, h: Header, payload: Bytes) {
        self.pending.before(&h);
        if self.srv.lease_gen.load(Ordering::Acquire) != self.gen {
            let mut r = reply_of(&h);
            r.status = libc::ESTALE as u32;
            return self.out.queue(r, Bytes::from_static(b"another engine took over this replica; this engine's lease is gone"));
        }
        self.srv.last_seen.store(self.srv.epoch.elapsed().as_millis() as u64, Ordering::Release);
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        self.srv.handle(&self.out, &self.pending, None, h, payload, &mut buf);
    }

    /// No reply reaches the sink after this (a request still in the pool is dropped).
    pub fn close(&self) {
        self.out.close();
    }
}

impl Drop for LocalConn {
    fn drop(&mut self) {
        self.out.close();
        self.srv.release(self.gen);
    }
}
