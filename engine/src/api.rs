//! The one small interface a frontend (NBD, ublk, FUSE) uses to do I/O on a volume.
//!
//! The I/O path is asynchronous and thread-light: a frontend opens a [`Session`] per
//! client connection (or per queue), [`Session::submit`]s requests tagged with its own
//! `tag`, and receives each result through its [`Completer`], called from the engine's
//! replica-reply collector thread. Nothing here blocks waiting for a replica to answer.
//!
//! Rules a frontend can rely on:
//! - every submitted request is completed exactly once, with the tag it was given;
//! - a Write/WriteZeroes/Trim completion means every healthy replica applied it;
//! - a Flush completion (or a request with `fua`) means every write completed before
//!   the flush was submitted is on stable storage on every healthy replica;
//! - requests are validated (range, alignment of nothing: any byte range is fine)
//!   by the engine, which completes bad ones with `EINVAL`/`ENOSPC`.

use bytes::Bytes;
use std::sync::Arc;

/// One I/O request. Offsets and lengths are in bytes.
#[derive(Debug, Clone)]
pub enum IoOp {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    /// The range must read back as zeros afterwards, even where older snapshots hold data.
    WriteZeroes { offset: u64, len: u32, fua: bool },
    /// Advisory discard: the range's content becomes unspecified (in practice: zeros or
    /// what it held); space is returned where no older layer needs the hole.
    Trim { offset: u64, len: u32, fua: bool },
    Flush,
    /// Which parts of the range hold data (allocated in some layer) and which are holes.
    BlockStatus { offset: u64, len: u32 },
}

/// One run of the volume's allocation map, as returned by [`IoOp::BlockStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    /// True when no layer holds data here (it reads as zeros).
    pub hole: bool,
}

/// The result of one request. Errors are positive Linux errno values (EIO, EINVAL, ...).
#[derive(Debug)]
pub enum IoResult {
    Done,
    Data(Bytes),
    Extents(Vec<Extent>),
    Err(i32),
}

/// Where results go. Implemented by each frontend connection.
pub trait Completer: Send + Sync + 'static {
    /// One request finished. May be called from any engine thread, concurrently.
    fn complete(&self, tag: u64, result: IoResult);
    /// A burst of `complete` calls is over: write buffered replies out now.
    fn flush(&self);
}

/// The volume as a frontend sees it.
pub trait BlockBackend: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// Open an I/O session whose results go to `completer`.
    fn open_session(&self, completer: Arc<dyn Completer>) -> std::io::Result<Box<dyn Session>>;
}

/// One client's I/O stream into the engine.
pub trait Session: Send + Sync {
    /// Queue a request. Frames may be buffered until [`Session::push`].
    fn submit(&self, tag: u64, op: IoOp);
    /// Send everything queued by `submit` to the replicas (one syscall per replica).
    /// Call when the frontend has no more requests ready to read.
    fn push(&self);
    /// Memory to receive a write's `len` bytes of data into before submitting them
    /// (frozen, as the `Write`'s data): memory the replicas on this host read straight
    /// from, saving a copy. None: take your own.
    fn write_buffer(&self, _len: usize) -> Option<WriteBuffer> {
        None
    }
}

/// See [`Session::write_buffer`].
pub use longhorn_replica::shm::Staged as WriteBuffer;
