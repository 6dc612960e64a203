//! The engine's side of one connection to a replica: the [`Dialer`] that makes every
//! connection (handshake and credentials), buffered sends, and one-off control requests.

use bytes::Bytes;
use longhorn_replica::auth::{self, Credentials};
use longhorn_replica::proto::{self, Header, Op, ReplicaInfo, HEADER_LEN};
use longhorn_replica::server::LocalConn;
use longhorn_replica::shm::Pool;
use std::cell::Cell;
use std::io::{self, BufWriter, IoSlice, Write};
use longhorn_replica::net::Stream;
use std::net::Shutdown;
use std::sync::Mutex;
use std::time::Duration;
use tracing::warn;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the engine says about itself whenever it dials a replica: the volume, its size,
/// and its credentials (the volume's secret and this engine's id, see
/// `longhorn_replica::auth`). Every connection to a replica is made through one.
#[derive(Clone, Debug)]
pub struct Dialer {
    pub volume: String,
    pub size: u64,
    pub creds: Credentials,
}

impl Dialer {
    /// Connects to `addr` (`HOST:PORT`, or `unix:PATH` for a replica on this host) and
    /// does the handshake. Returns the stream (no read timeout) and what the replica
    /// says about itself.
    pub fn connect(&self, addr: &str) -> io::Result<(Stream, ReplicaInfo)> {
        let mut s = Stream::connect(addr, CONNECT_TIMEOUT).map_err(|e| io::Error::new(e.kind(), format!("replica {e}")))?;
        let info = auth::client_handshake(&mut s, &self.volume, self.size, &self.creds).map_err(|e| e.into_io(addr))?;
        s.set_read_timeout(None)?;
        Ok((s, info))
    }

    /// One request/reply exchange on a fresh connection (control operations only).
    pub fn call(&self, addr: &str, op: Op, payload: &[u8]) -> io::Result<Bytes> {
        self.call_with_timeout(addr, op, payload, Duration::from_secs(30))
    }

    /// As [`Dialer::call`], for operations that run long (a rebuild's copy).
    pub fn call_long(&self, addr: &str, op: Op, payload: &[u8]) -> io::Result<Bytes> {
        self.call_with_timeout(addr, op, payload, Duration::from_secs(24 * 3600))
    }

    /// As [`Dialer::call`], waiting at most `t` for the answer.
    pub fn call_with_timeout(&self, addr: &str, op: Op, payload: &[u8], t: Duration) -> io::Result<Bytes> {
        let (mut s, _) = self.connect(addr)?;
        s.set_read_timeout(Some(t))?;
        let mut buf = Vec::new();
        proto::put_frame(&mut buf, Header::request(op, 1, 0, 0), payload);
        s.write_all(&buf)?;
        let (h, p) = proto::read_frame(&mut s).map_err(|e| io::Error::other(format!("replica {addr}: {op:?}: {e}")))?;
        if h.status != 0 {
            return Err(io::Error::other(format!("replica {addr}: {op:?} failed: {}", String::from_utf8_lossy(&p))));
        }
        Ok(p)
    }
}

/// Whether `addr` names a replica on this host: a unix socket, or a loopback address
/// (a replica in a network namespace of its own is reached by another address, and is
/// treated as the other host it stands for).
pub fn on_this_host(addr: &str) -> bool {
    if addr.starts_with("unix:") {
        return true;
    }
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => return false,
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Offers `pool` to the replica on a fresh connection `s`, before any I/O on it: the
/// replica maps it and big writes go through it, or refuses (another pid namespace,
/// another user) and they go inline. Err only when the connection itself failed.
pub fn offer_pool(s: &mut Stream, addr: &str, pool: &Pool) -> io::Result<bool> {
    let a = serde_json::to_vec(&pool.attach()).map_err(io::Error::other)?;
    let mut buf = Vec::new();
    proto::put_frame(&mut buf, Header::request(Op::ShareMemory, 0, 0, 0), &a);
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    s.write_all(&buf)?;
    let (h, p) = proto::read_frame(s).map_err(|e| io::Error::other(format!("replica {addr}: SHARE_MEMORY: {e}")))?;
    s.set_read_timeout(None)?;
    if h.op != Op::ShareMemory || h.id != 0 {
        return Err(io::Error::other(format!("replica {addr}: a {:?} reply to SHARE_MEMORY", h.op)));
    }
    if h.status != 0 {
        warn!(replica = addr, "the replica does not share memory with this engine ({}): big writes go through its socket", String::from_utf8_lossy(&p));
        return Ok(false);
    }
    Ok(true)
}

/// Fills in a header's payload length and CRC.
pub fn seal(mut h: Header, payload: &[u8]) -> Header {
    h.payload_len = payload.len() as u32;
    h.crc = proto::checksum(payload);
    h
}

/// The sending half of a data connection, shared by the session's submit path and its
/// failure handling: a TCP connection, or the replica embedded in this process.
pub struct ReplicaConn {
    pub addr: String,
    link: Link,
    /// The replica mapped the session's payload pool (see `offer_pool`).
    shared: bool,
}

enum Link {
    Tcp { stream: Stream, tx: Mutex<BufWriter<Stream>> },
    /// Requests wait in `queued` until the push that follows a burst, which sends what
    /// the TCP connections buffered first: the replicas over the network start on a
    /// write while this thread applies it here, instead of after.
    Local { conn: LocalConn, queued: Mutex<Vec<(Header, Bytes)>> },
}

thread_local! {
    /// Set while this thread applies a request to the embedded replica: replies that
    /// come back inline are flushed to the frontend by the caller's next push, once per
    /// burst, not one by one.
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside a request to the embedded replica (see [`INLINE`]).
pub fn inline() -> bool {
    INLINE.with(Cell::get)
}

impl ReplicaConn {
    pub fn new(addr: &str, stream: Stream, shared: bool) -> io::Result<ReplicaConn> {
        let w = stream.try_clone()?;
        Ok(ReplicaConn { addr: addr.to_string(), link: Link::Tcp { stream, tx: Mutex::new(BufWriter::with_capacity(256 * 1024, w)) }, shared })
    }

    pub fn local(addr: &str, conn: LocalConn) -> ReplicaConn {
        ReplicaConn { addr: addr.to_string(), link: Link::Local { conn, queued: Mutex::new(Vec::new()) }, shared: false }
    }

    /// Big writes reach this replica through the session's pool.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    pub fn is_local(&self) -> bool {
        matches!(self.link, Link::Local { .. })
    }

    /// A second handle on the socket for the reply collector (`None` in process: replies
    /// come through the sink).
    pub fn reader(&self) -> io::Result<Option<Stream>> {
        match &self.link {
            Link::Tcp { stream, .. } => stream.try_clone().map(Some),
            Link::Local { .. } => Ok(None),
        }
    }

    /// Queues a frame whose header already carries the payload's length and CRC (see
    /// [`seal`]: a write fanned out to N replicas is checksummed once, not N times). The
    /// payload is not copied when it is big (BufWriter passes large writes straight
    /// through after draining what it holds). In process, the request is applied at the
    /// push (now, with `push`).
    pub fn send(&self, h: Header, payload: &Bytes, push: bool) -> io::Result<()> {
        let tx = match &self.link {
            Link::Tcp { tx, .. } => tx,
            Link::Local { queued, .. } => {
                queued.lock().unwrap_or_else(|e| e.into_inner()).push((h, payload.clone()));
                return if push { self.push() } else { Ok(()) };
            }
        };
        debug_assert_eq!(h.payload_len as usize, payload.len());
        let hb = h.encode();
        let mut w = tx.lock().unwrap_or_else(|e| e.into_inner());
        if payload.len() > w.capacity() - w.buffer().len() {
            w.flush()?;
            // Header and payload in one writev.
            let mut done = 0usize;
            let total = HEADER_LEN + payload.len();
            while done < total {
                let n = if done < HEADER_LEN {
                    w.get_mut().write_vectored(&[IoSlice::new(&hb[done..]), IoSlice::new(payload)])?
                } else {
                    w.get_mut().write(&payload[done - HEADER_LEN..])?
                };
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "replica connection closed"));
                }
                done += n;
            }
        } else {
            w.write_all(&hb)?;
            w.write_all(payload)?;
        }
        if push {
            w.flush()?;
        }
        Ok(())
    }

    pub fn push(&self) -> io::Result<()> {
        match &self.link {
            Link::Tcp { tx, .. } => tx.lock().unwrap_or_else(|e| e.into_inner()).flush(),
            Link::Local { conn, queued } => {
                // Taken out first: a reply applied inline may lead to another send here
                // (a read re-sent after a drop), which must not find the lock held.
                loop {
                    let batch = std::mem::take(&mut *queued.lock().unwrap_or_else(|e| e.into_inner()));
                    if batch.is_empty() {
                        return Ok(());
                    }
                    let was = INLINE.with(|f| f.replace(true));
                    for (h, p) in batch {
                        conn.request(h, p);
                    }
                    INLINE.with(|f| f.set(was));
                }
            }
        }
    }

    /// Ends the connection, waking its reader thread (in process: no reply after this).
    pub fn shutdown(&self) {
        match &self.link {
            Link::Tcp { stream, .. } => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            Link::Local { conn, .. } => conn.close(),
        }
    }
}
