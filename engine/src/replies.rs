//! A session's reply collector: one thread reads the replies of every replica on this
//! host that the session reaches over a socket, through one epoll set (a replica on
//! another host gets a collector of its own: see `session::Inner::collector`).
//!
//! Why one thread and not one per replica: a write to N replicas comes back as N
//! replies at nearly the same moment. With a thread per connection each of them was
//! woken on its own (N wake-ups, each 10-50 µs of scheduler and cross-vCPU work on
//! these machines) and N-1 of them only took a lock to clear a bit. One thread wakes
//! once for whatever has arrived, applies it all, and writes the client's replies out
//! once per round.
//!
//! Rules:
//! - the collector only ever receives; requests are sent by the submitting thread on
//!   the same sockets (a dup of each), so nothing here may change the sockets' file
//!   flags: receives are non-blocking per call (`MSG_DONTWAIT`);
//! - a connection is read until it would block or [`BUDGET`] bytes were taken, then
//!   the next ready one is served: a replica streaming big reads cannot starve the
//!   others' replies;
//! - a connection that ends, errs or sends a damaged frame is taken out of the set
//!   before its descriptor is dropped (a dup stays open elsewhere, and epoll would keep
//!   reporting it), and the handler hears of it once;
//! - [`Collector::stop`] ends the thread at its next wake-up; connections added after
//!   it are refused;
//! - the collector never sends to a replica: a send can block until the replica reads,
//!   and the replica may itself be blocked sending replies only this thread reads. The
//!   handler hands such sends to another thread (`session::Inner::off_collector`).

use longhorn_replica::net::Stream;
use longhorn_replica::proto::{Assembler, FrameError, Header};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use tracing::warn;

/// Bytes taken from one connection before the others get their turn.
const BUDGET: usize = 4 << 20;

/// The epoll key of the stop event (slots are small integers).
const WAKE: u64 = u64::MAX;

/// What the collector does with what it reads.
pub(crate) trait Handler {
    /// One reply from slot `idx`. Some(reason): the replica must be dropped, and
    /// nothing more is read from it.
    fn frame(&self, idx: usize, h: Header, payload: Bytes) -> Option<String>;
    /// Slot `idx`'s connection is no longer read: it ended, carried a damaged frame,
    /// or `frame` condemned it.
    fn lost(&self, idx: usize, why: Lost);
    /// A round of replies is applied: write the client's replies out.
    fn round_done(&self);
}

pub(crate) struct Collector {
    epoll: OwnedFd,
    wake: OwnedFd,
    /// Connections added and not yet taken by the thread, and whether it was stopped.
    incoming: Mutex<(Vec<(usize, Stream)>, bool)>,
}

fn cvt(r: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

impl Collector {
    pub(crate) fn new() -> io::Result<Collector> {
        // SAFETY: plain syscalls; each descriptor returned is owned at once.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC), "epoll_create1")?) };
        let wake = unsafe { OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK), "eventfd")?) };
        let c = Collector { epoll, wake, incoming: Mutex::new((Vec::new(), false)) };
        c.ctl(libc::EPOLL_CTL_ADD, c.wake.as_raw_fd(), WAKE)?;
        Ok(c)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, u64: key };
        // SAFETY: both descriptors are open; `ev` outlives the call.
        cvt(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) }, "epoll_ctl").map(|_| ())
    }

    /// Hands slot `idx`'s receiving side (a dup of the connection) to the thread.
    pub(crate) fn add(&self, idx: usize, s: Stream) -> io::Result<()> {
        let fd = s.as_raw_fd();
        let mut inc = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
        if inc.1 {
            return Err(io::Error::other("the session's reply collector has stopped"));
        }
        // Queued before it is watched: the thread looks here when it sees a key it
        // does not know.
        inc.0.push((idx, s));
        if let Err(e) = self.ctl(libc::EPOLL_CTL_ADD, fd, idx as u64) {
            inc.0.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Ends the thread at its next wake-up (now, if it sleeps).
    pub(crate) fn stop(&self) {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full counter
        // (EAGAIN) still leaves it readable, which is all the thread needs.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn stopped(&self) -> bool {
        self.incoming.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// The thread's loop: runs until [`Collector::stop`].
    pub(crate) fn run(&self, h: &impl Handler) {
        let mut conns: HashMap<usize, (Stream, Assembler)> = HashMap::new();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            // SAFETY: `events` is live and its length is passed.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Cannot happen with a valid epoll descriptor and buffer; if it does,
                // the replicas' connections are ended so no request waits forever.
                warn!("replica reply collector: epoll_wait: {e}; dropping this session's connections");
                // No connection may be added that nobody would read.
                self.incoming.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
                for (idx, (s, _)) in conns.drain() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    h.lost(idx, Lost::Frame(FrameError::Io(io::Error::new(e.kind(), format!("epoll_wait: {e}")))));
                }
                h.round_done();
                return;
            }
            for ev in &events[..n as usize] {
                let key = ev.u64;
                if key == WAKE {
                    if self.stopped() {
                        for (_, (s, _)) in conns.drain() {
                            let _ = self.ctl(libc::EPOLL_CTL_DEL, s.as_raw_fd(), 0);
                        }
                        // What this round applied before the stop still goes out.
                        h.round_done();
                        return;
                    }
                    continue;
                }
                let idx = key as usize;
                if !conns.contains_key(&idx) {
                    let mut inc = self.incoming.lock().unwrap_or_else(|e| e.into_inner());
                    for (i, s) in inc.0.drain(..) {
                        conns.insert(i, (s, Assembler::new()));
                    }
                }
                let Some((s, asm)) = conns.get_mut(&idx) else { continue };
                let lost = match pump(idx, s, asm, h) {
                    Ok(()) => continue,
                    Err(lost) => lost,
                };
                if let Some((s, _)) = conns.remove(&idx) {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, s.as_raw_fd(), 0);
                }
                // The replies applied so far go out before the drop settles the rest.
                h.round_done();
                h.lost(idx, lost);
            }
            h.round_done();
        }
    }
}

/// Why a connection is no longer read.
pub(crate) enum Lost {
    /// [`Handler::frame`] gave this reason.
    Condemned(String),
    /// The stream ended or was damaged.
    Frame(FrameError),
}

/// Applies every whole frame slot `idx`'s assembler holds.
fn apply(idx: usize, asm: &mut Assembler, h: &impl Handler) -> Result<(), Lost> {
    while let Some(f) = asm.next() {
        let (hd, payload) = f.map_err(Lost::Frame)?;
        if let Some(reason) = h.frame(idx, hd, payload) {
            return Err(Lost::Condemned(reason));
        }
    }
    Ok(())
}

/// Takes what slot `idx` has sent, applying each whole frame.
fn pump(idx: usize, s: &Stream, asm: &mut Assembler, h: &impl Handler) -> Result<(), Lost> {
    let mut taken = 0usize;
    loop {
        apply(idx, asm, h)?;
        if taken >= BUDGET {
            // Only part of a frame is left buffered, so the socket still has (or will
            // have) bytes: epoll reports it again.
            return Ok(());
        }
        let spare = asm.spare();
        let room = spare.len();
        // SAFETY: recv writes at most `room` bytes into memory the assembler owns and
        // returns how many; only those are marked received.
        let r = unsafe { libc::recv(s.as_raw_fd(), spare.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
        if r > 0 {
            // SAFETY: recv wrote `r` bytes.
            unsafe { asm.filled(r as usize) };
            taken += r as usize;
            if (r as usize) < room {
                // The socket is drained: apply what came and go back to epoll, which
                // reports anything that arrived since (a receive that would only say
                // EAGAIN is a syscall per wake-up saved).
                return apply(idx, asm, h);
            }
            continue;
        }
        if r == 0 {
            return Err(Lost::Frame(if asm.buffered() == 0 {
                FrameError::Closed
            } else {
                FrameError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, format!("connection closed inside a frame ({} bytes of it came)", asm.buffered())))
            }));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(()),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(Lost::Frame(FrameError::Io(e))),
        }
    }
}
