//! The transmission phase of one connection.
//!
//! Two roles share a [`Conn`]:
//!
//! - the **reader** (the connection's own thread, [`serve`]) parses requests from a
//!   256 KiB `BufReader`, validates them, registers them in the pending table and
//!   `submit`s them to the engine. It calls `Session::push` only when it is about to
//!   block on the socket, so a pipelined burst of requests reaches the replicas in one
//!   go. Requests it can answer itself (validation errors, zero-length I/O) get their
//!   reply queued directly.
//! - the **completer** ([`Conn`] as [`Completer`]), called by engine threads,
//!   concurrently and in any order. `complete` turns a result into reply bytes and
//!   appends them to the output queue (data payloads are queued as `Bytes`, not
//!   copied); `flush` writes the queue out with one vectored `sendmsg`.
//!
//! The socket write in `flush` is non-blocking: an engine thread must never sleep
//! because one client stopped reading (that would stall every other client of the
//! volume). When the socket is full, a per-connection drainer thread takes over the
//! queue and does the blocking writes; completers keep appending behind it.
//!
//! Memory is bounded per connection: the reader stops admitting new requests while
//! in-flight requests plus unsent replies pin more than [`MAX_BUFFERED`] bytes.

use longhorn_replica::net::{sendmsg, Stream};
use super::proto::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use longhorn_engine::api::{Completer, IoOp, IoResult, Session};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, IoSlice, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Bytes one connection may pin in in-flight requests and unsent replies before the
/// reader stops taking new requests. At least twice [`MAX_PAYLOAD`] so a maximal request
/// is always admitted once the pipe drains.
const MAX_BUFFERED: usize = 64 * 1024 * 1024;
/// Accounting floor per request, so that a flood of tiny requests is bounded too.
const MIN_REQUEST_COST: usize = 4096;
/// Payloads up to this size are copied into the header buffer rather than queued as a
/// separate iovec: cheaper than an extra segment for small reads.
const COPY_THRESHOLD: usize = 8 * 1024;
/// If this much output accumulates without a `flush`, completers flush on their own.
const AUTO_FLUSH: usize = 4 * 1024 * 1024;
/// Most descriptors in one BLOCK_STATUS reply (1 MiB of payload).
const MAX_EXTENTS: usize = 128 * 1024;
/// iovecs per sendmsg call (well below IOV_MAX).
const MAX_IOV: usize = 64;
/// How long closing may wait for a client to read its last replies.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-connection cap on warnings about individual bad requests (the connection
/// summary at disconnect still counts all of them).
const MAX_REQUEST_WARNINGS: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    BlockStatus,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "READ",
            Kind::Write => "WRITE",
            Kind::WriteZeroes => "WRITE_ZEROES",
            Kind::Trim => "TRIM",
            Kind::Flush => "FLUSH",
            Kind::BlockStatus => "BLOCK_STATUS",
        }
    }
}

/// What the completer needs to know to answer a request.
#[derive(Debug, Clone, Copy)]
struct Pending {
    handle: u64,
    kind: Kind,
    offset: u64,
    len: u32,
    req_one: bool,
    cost: usize,
}

/// Output queue of one connection. Guarded by `Conn::out`.
#[derive(Default)]
struct Out {
    /// Sealed segments, in wire order.
    segs: VecDeque<Bytes>,
    /// Small reply bytes not yet sealed into `segs` (always after `segs`).
    hdr: BytesMut,
    /// Bytes in `segs` + `hdr`.
    queued: usize,
    /// Bytes the drainer took out of `segs` and is writing right now.
    in_drainer: usize,
    /// The drainer owns the socket's write side; flushers only append.
    draining: bool,
    /// A write failed: the connection is dead, output is discarded.
    failed: bool,
    /// The connection is finished; the drainer exits once idle.
    closed: bool,
}

impl Out {
    fn seal(&mut self) {
        if !self.hdr.is_empty() {
            let b = self.hdr.split().freeze();
            self.segs.push_back(b);
        }
    }

    /// Append small reply bytes produced by `f`.
    fn put(&mut self, f: impl FnOnce(&mut BytesMut)) {
        if self.failed {
            return;
        }
        if self.hdr.capacity() - self.hdr.len() < 512 {
            self.hdr.reserve(64 * 1024);
        }
        let before = self.hdr.len();
        f(&mut self.hdr);
        self.queued += self.hdr.len() - before;
    }

    /// Append a data payload without copying it (unless it is small).
    fn put_data(&mut self, data: Bytes) {
        if self.failed || data.is_empty() {
            return;
        }
        self.queued += data.len();
        if data.len() <= COPY_THRESHOLD {
            self.hdr.extend_from_slice(&data);
        } else {
            self.seal();
            self.segs.push_back(data);
        }
    }

    fn is_empty(&self) -> bool {
        self.segs.is_empty() && self.hdr.is_empty()
    }
}

/// Fill `iov` from the front of `segs`; returns how many slots were used.
fn fill_iov<'a>(segs: &'a VecDeque<Bytes>, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
    let mut n = 0;
    for s in segs.iter().take(MAX_IOV) {
        iov[n] = IoSlice::new(s);
        n += 1;
    }
    n
}

/// Drop `n` written bytes from the front of `segs`.
fn consume(segs: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = segs.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            segs.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

/// One NBD connection in transmission phase; the engine's [`Completer`] for it.
pub(crate) struct Conn {
    peer: String,
    sock: Stream,
    structured: bool,
    pending: Mutex<HashMap<u64, Pending>>,
    out: Mutex<Out>,
    /// Wakes the drainer (there is work, or the connection closed).
    drain_cv: Condvar,
    /// Wakes the reader: a request completed, output was written, or a write failed.
    progress_cv: Condvar,
    /// Requests submitted to the engine and not completed yet. Decremented under `out`.
    outstanding: AtomicUsize,
    /// Bytes pinned by those requests. Decremented under `out`.
    inflight_bytes: AtomicUsize,
}

// parking_lot, not std: its notify costs no syscall while nobody waits, and a reply
// path that notifies after every completion and burst paid two to four futex calls
// per request for waiters that almost never exist. (It has no poisoning either; the
// protected data stays consistent at every unlock point.)
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

impl Conn {
    /// `sock` is the connection's socket (a clone of the reader's), used for writing.
    pub(crate) fn new(peer: String, sock: Stream, structured: bool) -> Conn {
        Conn {
            peer,
            sock,
            structured,
            pending: Mutex::new(HashMap::new()),
            out: Mutex::new(Out::default()),
            drain_cv: Condvar::new(),
            progress_cv: Condvar::new(),
            outstanding: AtomicUsize::new(0),
            inflight_bytes: AtomicUsize::new(0),
        }
    }

    fn register(&self, tag: u64, p: Pending) {
        lock(&self.pending).insert(tag, p);
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        self.inflight_bytes.fetch_add(p.cost, Ordering::SeqCst);
    }

    fn total_buffered(&self, out: &Out) -> usize {
        self.inflight_bytes.load(Ordering::SeqCst) + out.queued + out.in_drainer
    }

    /// Queue the error reply for a request.
    fn put_error(&self, out: &mut Out, handle: u64, err: u32, msg: &str) {
        if self.structured {
            out.put(|b| put_structured_error(b, handle, err, msg));
        } else {
            out.put(|b| put_simple_reply(b, handle, err));
        }
    }

    /// Queue the success reply for a request that carries no data.
    fn put_ok(&self, out: &mut Out, handle: u64, kind: Kind) {
        if kind == Kind::Read && self.structured {
            // A zero-length read: a READ must get a structured reply, with no content.
            out.put(|b| {
                put_structured_header(b, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0)
            });
        } else {
            out.put(|b| put_simple_reply(b, handle, 0));
        }
    }

    /// Queue the reply for a completed engine request.
    fn put_result(&self, out: &mut Out, p: &Pending, result: IoResult) {
        match (p.kind, result) {
            (_, IoResult::Err(errno)) => {
                let msg = format!(
                    "{} failed: {}",
                    p.kind.name(),
                    io::Error::from_raw_os_error(errno)
                );
                debug!(peer = %self.peer, offset = p.offset, len = p.len, "{msg}");
                self.put_error(out, p.handle, nbd_errno(errno), &msg);
            }
            (Kind::Read, IoResult::Data(data)) if data.len() == p.len as usize => {
                if self.structured {
                    out.put(|b| {
                        put_structured_header(
                            b,
                            NBD_REPLY_FLAG_DONE,
                            NBD_REPLY_TYPE_OFFSET_DATA,
                            p.handle,
                            8 + p.len,
                        );
                        b.put_u64(p.offset);
                    });
                } else {
                    out.put(|b| put_simple_reply(b, p.handle, 0));
                }
                out.put_data(data);
            }
            (Kind::BlockStatus, IoResult::Extents(extents)) => {
                let mut descs: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(1024));
                let mut remaining = p.len;
                for e in extents {
                    let len = e.len.min(remaining);
                    if len == 0 {
                        if remaining == 0 {
                            break;
                        }
                        continue;
                    }
                    let full = descs.len() >= MAX_EXTENTS;
                    let flags = if e.hole {
                        NBD_STATE_HOLE | NBD_STATE_ZERO
                    } else {
                        0
                    };
                    match descs.last_mut() {
                        Some(last) if last.1 == flags => last.0 += len,
                        // The spec lets us describe less than asked; bound the reply.
                        _ if full => break,
                        _ => descs.push((len, flags)),
                    }
                    remaining -= len;
                }
                if descs.is_empty() {
                    // The spec requires at least one descriptor; "allocated" is always safe.
                    descs.push((p.len, 0));
                }
                if p.req_one {
                    descs.truncate(1);
                }
                out.put(|b| {
                    put_structured_header(
                        b,
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_BLOCK_STATUS,
                        p.handle,
                        4 + 8 * descs.len() as u32,
                    );
                    b.put_u32(BASE_ALLOCATION_ID);
                    for (len, flags) in &descs {
                        b.put_u32(*len);
                        b.put_u32(*flags);
                    }
                });
            }
            (Kind::Write | Kind::WriteZeroes | Kind::Trim | Kind::Flush, IoResult::Done) => {
                self.put_ok(out, p.handle, p.kind);
            }
            (kind, other) => {
                let what = match &other {
                    IoResult::Data(d) => format!("{} bytes of data", d.len()),
                    IoResult::Extents(e) => format!("{} extents", e.len()),
                    IoResult::Done => "Done".to_string(),
                    IoResult::Err(_) => "an error".to_string(),
                };
                warn!(
                    peer = %self.peer,
                    "engine answered a {}-byte {} with {what}; replying EIO",
                    p.len,
                    kind.name()
                );
                self.put_error(out, p.handle, NBD_EIO, "internal error: unexpected result");
            }
        }
    }

    /// Write out what is queued without blocking; hand over to the drainer if the
    /// socket is full.
    fn flush_locked(&self, out: &mut Out) {
        if out.failed || out.draining {
            return;
        }
        out.seal();
        while !out.segs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = fill_iov(&out.segs, &mut iov);
            match sendmsg(self.sock.as_raw_fd(), &iov[..n], libc::MSG_DONTWAIT) {
                Ok(written) => {
                    out.queued -= written;
                    consume(&mut out.segs, written);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.draining = true;
                    self.drain_cv.notify_one();
                    break;
                }
                Err(e) => {
                    self.fail(out, &e);
                    break;
                }
            }
        }
        self.progress_cv.notify_all();
    }

    /// The socket is unusable: discard output and wake everyone.
    fn fail(&self, out: &mut Out, e: &io::Error) {
        if !out.failed {
            if out.closed {
                debug!(peer = %self.peer, "writing final replies failed: {e}");
            } else {
                warn!(peer = %self.peer, "writing replies failed: {e}; closing the connection");
            }
            out.failed = true;
            out.segs.clear();
            out.hdr.clear();
            out.queued = 0;
            out.draining = false;
            // Makes the reader's blocking read return, so the connection winds down.
            let _ = self.sock.shutdown(Shutdown::Both);
        }
        self.progress_cv.notify_all();
        self.drain_cv.notify_all();
    }

    /// The drainer thread: blocking writes while the socket is congested.
    fn drain_loop(&self) {
        let mut out = lock(&self.out);
        loop {
            if out.draining && !out.failed {
                out.seal();
                let mut batch = std::mem::take(&mut out.segs);
                let total = out.queued;
                out.queued = 0;
                out.in_drainer = total;
                drop(out);
                let res = self.write_blocking(&mut batch);
                out = lock(&self.out);
                out.in_drainer = 0;
                if let Err(e) = res {
                    self.fail(&mut out, &e);
                } else if out.is_empty() {
                    out.draining = false;
                }
                self.progress_cv.notify_all();
                continue;
            }
            if out.closed {
                return;
            }
            self.drain_cv.wait(&mut out);
        }
    }

    fn write_blocking(&self, segs: &mut VecDeque<Bytes>) -> io::Result<()> {
        while !segs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = fill_iov(segs, &mut iov);
            match sendmsg(self.sock.as_raw_fd(), &iov[..n], 0) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => consume(segs, written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // SO_SNDTIMEO expired (only set while closing).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not read its replies in time",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Wait (holding nothing else) until `done` holds; logs if it takes long.
    fn wait_for(&self, what: &str, mut done: impl FnMut(&Conn, &Out) -> bool) {
        let start = Instant::now();
        let mut next_warn = Duration::from_secs(30);
        let mut out = lock(&self.out);
        while !done(self, &out) {
            self.progress_cv.wait_for(&mut out, Duration::from_secs(1));
            if start.elapsed() >= next_warn {
                warn!(
                    peer = %self.peer,
                    outstanding = self.outstanding.load(Ordering::SeqCst),
                    "still waiting for {what} after {:?}",
                    start.elapsed()
                );
                next_warn += Duration::from_secs(30);
            }
        }
    }

    fn failed(&self) -> bool {
        lock(&self.out).failed
    }
}

impl Completer for Conn {
    fn complete(&self, tag: u64, result: IoResult) {
        let Some(p) = lock(&self.pending).remove(&tag) else {
            warn!(peer = %self.peer, tag, "completion for an unknown request tag; ignored");
            return;
        };
        let mut out = lock(&self.out);
        self.put_result(&mut out, &p, result);
        self.inflight_bytes.fetch_sub(p.cost, Ordering::SeqCst);
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        if out.queued >= AUTO_FLUSH {
            self.flush_locked(&mut out);
        } else {
            self.progress_cv.notify_all();
        }
    }

    fn flush(&self) {
        let mut out = lock(&self.out);
        self.flush_locked(&mut out);
    }
}

/// Why the transmission phase ended.
enum End {
    /// NBD_CMD_DISC: the clean way.
    Disconnect,
    /// The client closed its side between requests.
    Eof,
    /// Reading from the socket failed.
    ReadError(io::Error),
    /// Writing replies failed.
    WriteFailed,
    /// The client broke the protocol (logged as a warning when winding down).
    Protocol(String),
}

/// Read exactly `buf.len()` bytes unless EOF comes first; returns how many were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct Reader<'a> {
    conn: &'a Arc<Conn>,
    session: &'a dyn Session,
    rd: &'a mut BufReader<Stream>,
    size: u64,
    base_allocation: bool,
    next_tag: u64,
    /// Requests submitted since the last `push`.
    unpushed: bool,
    /// Replies queued by the reader itself since the last flush.
    unflushed: bool,
    requests: u64,
    rejected: u64,
}

impl Reader<'_> {
    /// Hand everything we have to the engine and the socket: we are about to block.
    fn kick(&mut self) {
        if self.unpushed {
            self.session.push();
            self.unpushed = false;
        }
        if self.unflushed {
            self.conn.flush();
            self.unflushed = false;
        }
    }

    /// Called before reading `need` bytes: if they are not buffered, the read may block.
    fn before_read(&mut self, need: usize) {
        if self.rd.buffer().len() < need {
            self.kick();
        }
    }

    fn reply_error(&mut self, req: &Request, err: u32, msg: &str) {
        self.rejected += 1;
        if self.rejected <= MAX_REQUEST_WARNINGS {
            warn!(
                peer = %self.conn.peer,
                cmd = cmd_name(req.typ),
                offset = req.offset,
                len = req.len,
                flags = req.flags,
                "rejecting request: {msg}"
            );
        }
        let mut out = lock(&self.conn.out);
        self.conn.put_error(&mut out, req.handle, err, msg);
        self.unflushed = true;
    }

    fn reply_ok(&mut self, req: &Request, kind: Kind) {
        let mut out = lock(&self.conn.out);
        self.conn.put_ok(&mut out, req.handle, kind);
        self.unflushed = true;
    }

    /// Wait until the connection has room for a request costing `cost` bytes.
    /// Returns false if the connection died meanwhile.
    fn admit(&mut self, cost: usize) -> bool {
        {
            let out = lock(&self.conn.out);
            if out.failed {
                return false;
            }
            let used = self.conn.total_buffered(&out);
            if used == 0 || used + cost <= MAX_BUFFERED {
                return true;
            }
        }
        // Over budget: make sure everything is moving, then wait for it to drain.
        self.kick();
        self.conn.flush();
        self.conn.wait_for("in-flight requests to drain", |c, out| {
            let used = c.total_buffered(out);
            out.failed || used == 0 || used + cost <= MAX_BUFFERED
        });
        !self.conn.failed()
    }

    fn submit(&mut self, req: &Request, kind: Kind, op: IoOp) -> bool {
        let cost = match kind {
            Kind::Read | Kind::Write => (req.len as usize).max(MIN_REQUEST_COST),
            _ => MIN_REQUEST_COST,
        };
        if !self.admit(cost) {
            return false;
        }
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let p = Pending {
            handle: req.handle,
            kind,
            offset: req.offset,
            len: req.len,
            req_one: req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            cost,
        };
        // Register first: the engine may complete the request inside `submit`.
        self.conn.register(tag, p);
        self.session.submit(tag, op);
        self.unpushed = true;
        true
    }

    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= self.size)
    }

    /// Check flags and range; on failure the error reply is queued and false returned.
    fn validate(&mut self, req: &Request, allowed_flags: u16, beyond_end_err: u32) -> bool {
        let unknown = req.flags & !allowed_flags;
        if unknown != 0 {
            let msg = format!(
                "unsupported command flags {unknown:#x} for {}",
                cmd_name(req.typ)
            );
            self.reply_error(req, NBD_EINVAL, &msg);
            return false;
        }
        if !self.in_range(req) {
            let msg = format!(
                "range {}+{} is beyond the end of the export ({} bytes)",
                req.offset, req.len, self.size
            );
            self.reply_error(req, beyond_end_err, &msg);
            return false;
        }
        true
    }

    fn run(&mut self) -> End {
        loop {
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            self.before_read(REQUEST_HEADER_LEN);
            match read_full(self.rd, &mut hdr) {
                Ok(0) => return End::Eof,
                Ok(n) if n < REQUEST_HEADER_LEN => {
                    return End::Protocol(format!(
                        "connection closed in the middle of a request header ({n} of {REQUEST_HEADER_LEN} bytes)"
                    ))
                }
                Ok(_) => {}
                Err(e) => return End::ReadError(e),
            }
            let req = match Request::parse(&hdr) {
                Ok(r) => r,
                Err(magic) => {
                    return End::Protocol(format!(
                        "bad request magic {magic:#010x} (expected {NBD_REQUEST_MAGIC:#010x}); the stream cannot be resynchronised"
                    ))
                }
            };
            self.requests += 1;
            if let Some(end) = self.handle(req) {
                return end;
            }
        }
    }

    /// Process one request; `Some(end)` stops the connection.
    fn handle(&mut self, req: Request) -> Option<End> {
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        match req.typ {
            NBD_CMD_READ => {
                if req.len > MAX_PAYLOAD {
                    let msg = format!(
                        "read of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                        req.len
                    );
                    self.reply_error(&req, NBD_EINVAL, &msg);
                } else if self.validate(&req, NBD_CMD_FLAG_FUA, NBD_EINVAL) {
                    if req.len == 0 {
                        self.reply_ok(&req, Kind::Read);
                    } else if !self.submit(
                        &req,
                        Kind::Read,
                        IoOp::Read {
                            offset: req.offset,
                            len: req.len,
                        },
                    ) {
                        return Some(End::WriteFailed);
                    }
                }
            }
            NBD_CMD_WRITE => {
                let len = req.len as usize;
                if req.len > MAX_PAYLOAD {
                    // We cannot trust the client to be sane enough to skip its payload
                    // reliably; answer and hang up.
                    let msg = format!(
                        "write of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                        req.len
                    );
                    self.reply_error(&req, NBD_EINVAL, &msg);
                    return Some(End::Protocol(msg));
                }
                self.before_read(len);
                // Straight into memory the replicas on this host read (no copy later),
                // or into memory never zeroed first (a memset per 1 MiB write otherwise).
                let (got, have, payload) = match self.session.write_buffer(len) {
                    Some(mut buf) => {
                        let want = buf.as_mut_slice().len();
                        match read_full(self.rd, buf.as_mut_slice()) {
                            Ok(n) if n == want => (Ok(()), n, buf.freeze()),
                            Ok(n) => (Err(io::ErrorKind::UnexpectedEof.into()), n, Bytes::new()),
                            Err(e) => (Err(e), 0, Bytes::new()),
                        }
                    }
                    None => {
                        let mut v = Vec::new();
                        let r = longhorn_replica::net::read_payload(self.rd, len, &mut v);
                        (r, v.len(), Bytes::from(v))
                    }
                };
                match got {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Some(End::Protocol(format!(
                            "connection closed in the middle of a WRITE payload ({have} of {len} bytes); request dropped"
                        )))
                    }
                    Err(e) => return Some(End::ReadError(e)),
                }
                if self.validate(&req, NBD_CMD_FLAG_FUA, NBD_ENOSPC) {
                    if len == 0 {
                        self.reply_ok(&req, Kind::Write);
                    } else {
                        let op = IoOp::Write {
                            offset: req.offset,
                            data: payload,
                            fua,
                        };
                        if !self.submit(&req, Kind::Write, op) {
                            return Some(End::WriteFailed);
                        }
                    }
                }
            }
            NBD_CMD_DISC => return Some(End::Disconnect),
            NBD_CMD_FLUSH => {
                // Offset and length are reserved (zero); not worth failing a flush over.
                if req.flags & !NBD_CMD_FLAG_FUA != 0 {
                    let msg = format!("unsupported command flags {:#x} for FLUSH", req.flags);
                    self.reply_error(&req, NBD_EINVAL, &msg);
                } else if !self.submit(&req, Kind::Flush, IoOp::Flush) {
                    return Some(End::WriteFailed);
                }
            }
            NBD_CMD_TRIM => {
                if self.validate(&req, NBD_CMD_FLAG_FUA, NBD_EINVAL) {
                    if req.len == 0 {
                        self.reply_ok(&req, Kind::Trim);
                    } else {
                        let op = IoOp::Trim {
                            offset: req.offset,
                            len: req.len,
                            fua,
                        };
                        if !self.submit(&req, Kind::Trim, op) {
                            return Some(End::WriteFailed);
                        }
                    }
                }
            }
            NBD_CMD_WRITE_ZEROES => {
                // NO_HOLE only forbids punching holes; writing zeroes is always allowed.
                if self.validate(&req, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE, NBD_ENOSPC) {
                    if req.len == 0 {
                        self.reply_ok(&req, Kind::WriteZeroes);
                    } else {
                        let op = IoOp::WriteZeroes {
                            offset: req.offset,
                            len: req.len,
                            fua,
                        };
                        if !self.submit(&req, Kind::WriteZeroes, op) {
                            return Some(End::WriteFailed);
                        }
                    }
                }
            }
            NBD_CMD_BLOCK_STATUS => {
                if !self.base_allocation {
                    self.reply_error(
                        &req,
                        NBD_EINVAL,
                        "BLOCK_STATUS without a negotiated metadata context",
                    );
                } else if req.len == 0 {
                    self.reply_error(&req, NBD_EINVAL, "BLOCK_STATUS of zero length");
                } else if self.validate(&req, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE, NBD_EINVAL) {
                    let op = IoOp::BlockStatus {
                        offset: req.offset,
                        len: req.len,
                    };
                    if !self.submit(&req, Kind::BlockStatus, op) {
                        return Some(End::WriteFailed);
                    }
                }
            }
            other => {
                let msg = format!("unknown command {other} ({})", cmd_name(other));
                self.reply_error(&req, NBD_EINVAL, &msg);
            }
        }
        None
    }
}

/// Run the transmission phase until the client disconnects, then wind the connection
/// down: every submitted request is completed and its reply written (or discarded if
/// the socket is dead) before the session is dropped and the socket closed.
pub(crate) fn serve(
    conn: Arc<Conn>,
    session: Box<dyn Session>,
    rd: &mut BufReader<Stream>,
    size: u64,
    base_allocation: bool,
) {
    let peer = conn.peer.clone();
    let drainer = {
        let c = conn.clone();
        std::thread::Builder::new()
            .name("nbd-reply".to_string())
            .spawn(move || c.drain_loop())
    };
    let drainer = match drainer {
        Ok(h) => h,
        Err(e) => {
            warn!(peer = %peer, "cannot start the reply thread: {e}; closing the connection");
            let _ = conn.sock.shutdown(Shutdown::Both);
            return;
        }
    };

    let (end, requests, rejected) = {
        let mut reader = Reader {
            conn: &conn,
            session: session.as_ref(),
            rd: &mut *rd,
            size,
            base_allocation,
            next_tag: 0,
            unpushed: false,
            unflushed: false,
            requests: 0,
            rejected: 0,
        };
        let end = reader.run();
        // Whatever was submitted must reach the engine, or it would never complete.
        reader.kick();
        (end, reader.requests, reader.rejected)
    };

    let (reason, graceful) = match &end {
        End::Disconnect => ("client sent NBD_CMD_DISC".to_string(), true),
        End::Eof => ("client closed the connection".to_string(), true),
        End::ReadError(e) => (format!("read error: {e}"), false),
        End::WriteFailed => ("writing replies failed".to_string(), false),
        End::Protocol(msg) => {
            warn!(peer = %peer, "protocol error: {msg}; closing the connection");
            (format!("protocol error: {msg}"), true)
        }
    };
    if !graceful {
        let _ = conn.sock.shutdown(Shutdown::Both);
    }
    // Bound how long a client that stopped reading can hold us up from here on.
    let _ = conn.sock.set_write_timeout(Some(CLOSE_WRITE_TIMEOUT));

    conn.wait_for("in-flight requests to complete", |c, _| {
        c.outstanding.load(Ordering::SeqCst) == 0
    });
    drop(session);
    conn.flush();
    conn.wait_for("the last replies to be written", |_, out| {
        out.failed || (out.is_empty() && !out.draining)
    });
    {
        let mut out = lock(&conn.out);
        out.closed = true;
        conn.drain_cv.notify_all();
    }
    if drainer.join().is_err() {
        warn!(peer = %peer, "reply thread panicked");
    }
    if graceful {
        linger(&conn.sock, rd);
    }
    let _ = conn.sock.shutdown(Shutdown::Both);
    info!(peer = %peer, requests, rejected, "NBD client disconnected: {reason}");
}

/// Close our sending side, then briefly discard what the client still sends, so the
/// kernel does not answer unread data with a reset that could destroy our last
/// replies before the client reads them.
pub(crate) fn linger(sock: &Stream, rd: &mut BufReader<Stream>) {
    let _ = sock.shutdown(Shutdown::Write);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut budget: usize = 64 * 1024 * 1024;
    let mut sink = [0u8; 64 * 1024];
    while Instant::now() < deadline && budget > 0 {
        match rd.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => budget = budget.saturating_sub(n),
        }
    }
}

