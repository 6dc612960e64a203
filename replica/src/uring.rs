//! Reads the page cache missed, kept in flight by the connection's own thread.
//!
//! A connection's thread answers cached reads inline (`server`); a miss used to go to a
//! pool thread that blocked in `pread` and sent its one reply alone. Here the thread
//! hands the kernel the miss's file pieces in an io_uring instead and goes on with the
//! next request; the kernel finishes the read when the disk does (buffered reads wait
//! on the page, not in a worker), and the thread reaps what has finished between bursts
//! of requests, so the replies of several misses leave in one `writev` and no other
//! thread is woken for them.
//!
//! Rules that keep this sound:
//! - Memory the kernel writes into (a job's buffer, or the region of the engine's pool
//!   the request lent) belongs to the job until its last completion is reaped. A ring
//!   is not dropped with a job in flight: `Drop` reaps them all, and if the kernel will
//!   not say they are done it leaks their memory rather than free it under the kernel.
//! - Each piece holds its file open (an `Arc` from the chain) until reaped, so a layer
//!   the chain drops meanwhile (a snapshot merged away) cannot have its descriptor
//!   reused under a read.
//! - Only the connection's thread submits and reaps (`SINGLE_ISSUER`), and completions
//!   are run only when it asks (`DEFER_TASKRUN`): so while a job is in flight the thread
//!   must not block on its socket, but wait here, where the socket is watched too.
//! - A piece the kernel read short or failed is read again whole the blocking way
//!   (`Done::retry`), which gives the real answer and the error with its file's name.
//!   So is a read planned before a snapshot's hidden blocks were punched (`Done::planned`,
//!   `Store::punched`): the block it found in the snapshot may be a hole now, and the
//!   head holds its data.

use crate::proto::Header;
use crate::shm::{Descriptor, Mapping};
use crate::store::{Piece, Store};
use bytes::BytesMut;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use tracing::warn;

/// Submission queue size: the pieces handed over before the next submit.
const ENTRIES: u32 = 256;

/// Most pieces in flight at once (the completion queue is twice [`ENTRIES`]).
const MAX_PIECES: usize = 256;

/// Most bytes of misses in flight at once, as the pool holds at most (a peer that
/// pipelines reads it does not collect holds no more of the replica's memory).
const MAX_BYTES: usize = 64 << 20;

/// A miss of more pieces than this (a long read over a fragmented chain) goes to the
/// reader pool instead of taking the ring's room.
pub(crate) const MAX_JOB_PIECES: usize = 64;

const POLL: u64 = u64::MAX;

/// Where a miss's data goes.
pub(crate) enum Dst {
    /// A buffer of the request's size, its bytes not yet set (READ).
    Owned(BytesMut),
    /// The region of the engine's pool at this offset (READ_SHARED).
    Shared(Arc<Mapping>, u64),
}

/// A miss the kernel has finished with (or that needed no disk at all).
pub(crate) struct Done {
    pub(crate) header: Header,
    pub(crate) dst: Dst,
    /// A piece failed or came back short: read it all again the blocking way.
    pub(crate) retry: bool,
    /// The store's punch count the read was planned under (`Store::plan_read`).
    pub(crate) planned: u64,
}

struct Job {
    header: Header,
    dst: Dst,
    _files: Vec<Arc<File>>,
    left: usize,
    retry: bool,
    planned: u64,
}

/// What [`MissRing::start`] did with a miss.
pub(crate) enum Started {
    /// In flight: its [`Done`] comes from a later reap.
    InFlight,
    /// Nothing to wait for (holes only, or the range was refused): answer it now.
    Now(Done),
    /// Too many pieces for the ring: read it elsewhere.
    TooBig(Header, Dst),
}

pub(crate) struct MissRing {
    ring: IoUring,
    sock: RawFd,
    jobs: Vec<Option<Job>>,
    free: Vec<usize>,
    live: usize,
    pieces: usize,
    bytes: usize,
    poll_armed: bool,
    ready: Vec<Done>,
}

impl MissRing {
    /// A ring for the connection on `sock`; Err where io_uring is not allowed (an old
    /// kernel, `kernel.io_uring_disabled`, a seccomp profile): the pool serves then.
    pub(crate) fn new(sock: &impl AsRawFd) -> io::Result<MissRing> {
        let ring = IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(ENTRIES)?;
        Ok(MissRing { ring, sock: sock.as_raw_fd(), jobs: Vec::new(), free: Vec::new(), live: 0, pieces: 0, bytes: 0, poll_armed: false, ready: Vec::new() })
    }

    /// Whether any miss is in flight (the thread must then wait in [`MissRing::reap`],
    /// not on its socket).
    pub(crate) fn busy(&self) -> bool {
        self.live > 0
    }

    /// Whether a miss in flight reads any of `[start, end)` (`None`: any at all).
    pub(crate) fn overlaps(&self, range: Option<(u64, u64)>) -> bool {
        // Asked before every write: most find nothing in flight.
        self.live > 0
            && self.jobs.iter().flatten().any(|j| {
                let (s, e) = (j.header.offset, j.header.offset.saturating_add(j.header.count as u64));
                range.is_none_or(|(a, b)| s < b && a < e)
            })
    }

    /// Whether a miss may be started now; when not, the caller reaps (blocking) first.
    pub(crate) fn has_room(&self) -> bool {
        self.pieces + MAX_JOB_PIECES <= MAX_PIECES && self.bytes < MAX_BYTES
    }

    /// Plans the miss `header` into `dst` and hands its pieces to the kernel (submitted
    /// with the next reap). The caller has checked [`MissRing::has_room`].
    pub(crate) fn start(&mut self, store: &Store, header: Header, mut dst: Dst) -> Started {
        let len = header.count as usize;
        let ptr = match &mut dst {
            Dst::Owned(b) => {
                b.clear();
                b.reserve(len);
                b.spare_capacity_mut().as_mut_ptr().cast::<u8>()
            }
            Dst::Shared(m, off) => match m.region(header.count, &Descriptor { offset: *off, crc: 0 }.encode()) {
                Ok((_, s)) => s.as_mut_ptr(),
                Err(_) => return Started::Now(Done { header, dst, retry: true, planned: 0 }),
            },
        };
        let mut pieces: Vec<Piece> = Vec::new();
        // SAFETY: `ptr` is valid for `len` bytes: the buffer's reserved capacity, or the
        // lent region of exactly the request's size.
        let planned = match unsafe { store.plan_read(header.offset, ptr, len, &mut pieces) } {
            Ok(p) => p,
            Err(_) => return Started::Now(Done { header, dst, retry: true, planned: 0 }),
        };
        if pieces.is_empty() {
            if let Dst::Owned(b) = &mut dst {
                // SAFETY: plan_read zeroed all `len` bytes (holes only).
                unsafe { b.set_len(len) };
            }
            return Started::Now(Done { header, dst, retry: false, planned });
        }
        if pieces.len() > MAX_JOB_PIECES || !self.has_room() {
            return Started::TooBig(header, dst);
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.jobs.push(None);
            self.jobs.len() - 1
        });
        // `job` owns the memory the kernel writes (its heap buffer or the lent region
        // does not move with it), and the files of the pieces handed over; it goes in its
        // slot before anything is reaped.
        let mut job = Job { header, dst, left: 0, _files: Vec::with_capacity(pieces.len()), retry: false, planned };
        for p in pieces {
            // The slot in the high half, the length the piece must read in the low.
            let sqe = opcode::Read::new(types::Fd(p.file.as_raw_fd()), p.dst, p.len as u32)
                .offset(p.at)
                .build()
                .user_data(((slot as u64) << 32) | p.len as u64);
            if let Err(e) = self.push(&sqe) {
                warn!("cannot hand a cache-miss read to io_uring: {e}");
                // What the kernel has is reaped as usual; the whole read is then redone.
                job.retry = true;
                break;
            }
            job.left += 1;
            job._files.push(p.file);
        }
        if job.left == 0 {
            self.free.push(slot);
            return Started::Now(Done { header: job.header, dst: job.dst, retry: true, planned });
        }
        self.pieces += job.left;
        self.bytes += len;
        self.live += 1;
        self.jobs[slot] = Some(job);
        Started::InFlight
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        for _ in 0..3 {
            // SAFETY: what the entry points at (a piece's destination, the socket) stays
            // valid until its completion is reaped (the module's rules).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.submit(0)?;
        }
        Err(io::Error::other("the io_uring submission queue stays full"))
    }

    fn submit(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), format!("io_uring submit for cache-miss reads: {e}"))),
        }
    }

    /// Submits what was started and takes what has finished (into [`MissRing::take`]).
    /// With `block`, waits for at least one completion first; with `socket` as well, a
    /// request arriving on the connection ends the wait too, and the result says
    /// whether one has (so the caller's read will not block).
    pub(crate) fn reap(&mut self, block: bool, socket: bool) -> io::Result<bool> {
        if socket && !self.poll_armed {
            let sqe = opcode::PollAdd::new(types::Fd(self.sock), libc::POLLIN as u32).build().user_data(POLL);
            self.push(&sqe)?;
            self.poll_armed = true;
        }
        self.submit(usize::from(block))?;
        let mut polled = false;
        for cqe in self.ring.completion() {
            if cqe.user_data() == POLL {
                self.poll_armed = false;
                polled = true;
                continue;
            }
            let slot = (cqe.user_data() >> 32) as usize;
            let want = (cqe.user_data() & 0xffff_ffff) as i64;
            let Some(job) = self.jobs.get_mut(slot).and_then(Option::as_mut) else { continue };
            if i64::from(cqe.result()) != want {
                job.retry = true;
            }
            job.left -= 1;
            self.pieces -= 1;
            if job.left > 0 {
                continue;
            }
            if let Some(mut job) = self.jobs[slot].take() {
                self.free.push(slot);
                self.live -= 1;
                self.bytes -= job.header.count as usize;
                if let (Dst::Owned(b), false) = (&mut job.dst, job.retry) {
                    // SAFETY: every piece read its full length and plan_read zeroed the
                    // rest, so all `count` reserved bytes are written.
                    unsafe { b.set_len(job.header.count as usize) };
                }
                self.ready.push(Done { header: job.header, dst: job.dst, retry: job.retry, planned: job.planned });
            }
        }
        // A poll completion may be older than the last read of the socket: say readable
        // only if a request is there now.
        Ok(polled && self.readable())
    }

    fn readable(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.sock, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd we own, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        // A hang-up or error on the socket counts (the caller's read then reports it);
        // a failed poll (EINTR) does not: the caller waits again.
        n > 0
    }

    /// The misses finished by the last reaps.
    pub(crate) fn take(&mut self) -> std::vec::Drain<'_, Done> {
        self.ready.drain(..)
    }
}

impl Drop for MissRing {
    fn drop(&mut self) {
        while self.live > 0 {
            if let Err(e) = self.reap(true, false) {
                warn!("cannot reap cache-miss reads of a closing connection ({e}); their buffers are leaked, not freed under the kernel");
                std::mem::forget(std::mem::take(&mut self.jobs));
                return;
            }
            self.ready.clear();
        }
    }
}
