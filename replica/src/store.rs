//! The replica's data: a chain of sparse files read through an extent index.
//!
//! Layers are numbered from the bottom (0 = oldest snapshot) to the head (last). The
//! `top` map says which layer holds each range; `below` says where any layer under the
//! head holds data. Both are built at open from the files' allocation
//! (SEEK_DATA/SEEK_HOLE) and kept up to date by every write.
//!
//! Rules that keep data safe:
//! - Writes go to the head only. A hole in the head means "look below", so zeros that
//!   must hide older data are written as real zero blocks; holes are punched only where
//!   no older layer holds data.
//! - The filesystem allocates whole 4 KiB blocks. A write that covers part of a block is
//!   widened to the whole block with the block's current content (read through the
//!   chain), so the head never holds a block whose unwritten part shadows older data
//!   with zeros after a reopen rebuilds the index from the allocation.
//! - Data is written before the index points at it.
//! - The revision counter lives in a shared memory mapping of `revision.counter`: bumping
//!   it costs a store, survives a kill of the process, and reaches the disk at flush.

use crate::extent::{ExtentMap, Segment};
use crate::meta::{self, DiskMeta, MetaError, VolumeMeta};
use crate::proto::ReplicaInfo;
use bytes::BytesMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The filesystem block: the unit of allocation in the layer files.
pub const BLOCK: u64 = 4096;

/// Most layers (snapshots and the head) a chain may have: the extent index numbers
/// layers with a u16, and each layer is an open file. Snapshots are refused before a
/// chain would grow past it, so every chain that was written can be opened again.
pub const MAX_LAYERS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("{path} at offset {offset}: {source}")]
    Io { path: PathBuf, offset: u64, source: io::Error },
    #[error("{path}: another replica process serves this directory (or is changing it); stop it first")]
    Busy { path: PathBuf },
    #[error("{path}: the replica is {size} bytes; it cannot shrink to {requested}")]
    Shrink { path: PathBuf, size: u64, requested: u64 },
    #[error("{path}: the filesystem does not hold a file of {requested} bytes: {source}")]
    TooLarge { path: PathBuf, requested: u64, source: io::Error },
}

/// One process at a time owns a replica directory: two serving it would each keep their
/// own head and revision counter over the same files, and an offline change (`expand`)
/// must not resize files under a replica that serves them. An exclusive flock on the
/// directory itself (no file added to it), held until the returned file is dropped or
/// the process ends, however it ends.
pub fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let f = File::open(dir).map_err(|e| MetaError::io(dir, e))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(StoreError::Busy { path: dir.to_path_buf() });
        }
        return Err(MetaError::io(dir, e).into());
    }
    Ok(f)
}

pub(crate) struct Layer {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    /// Shared so a read the kernel still holds (see `uring`) keeps the descriptor open
    /// while the chain drops the layer.
    pub(crate) file: Arc<File>,
}

pub(crate) struct Maps {
    /// Which layer holds each range (the newest that has it).
    pub(crate) top: ExtentMap,
    /// Where any layer under the head holds data.
    pub(crate) below: ExtentMap,
}

/// The open chain. I/O holds the read lock for the whole operation; chain changes
/// (rotation, merge, revert) take the write lock, so they never race an I/O.
pub(crate) struct Chain {
    pub(crate) layers: Vec<Layer>,
    pub(crate) maps: RwLock<Maps>,
}

impl Chain {
    pub(crate) fn head(&self) -> &Layer {
        &self.layers[self.layers.len() - 1]
    }

    pub(crate) fn head_index(&self) -> u16 {
        (self.layers.len() - 1) as u16
    }

    fn segments(&self, offset: u64, end: u64) -> Vec<Segment> {
        self.maps.read().unwrap_or_else(|p| p.into_inner()).top.lookup(offset, end)
    }

    pub(crate) fn maps_mut(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Store {
    dir: PathBuf,
    volume: String,
    size: u64,
    sector_size: u64,
    was_dirty: bool,
    pub(crate) chain: RwLock<Chain>,
    pub(crate) meta: Mutex<VolumeMeta>,
    revision: Revision,
    /// Serialises read-modify-write of partial blocks, so two writes to different
    /// sectors of one block cannot lose each other.
    pub(crate) rmw: Mutex<()>,
    /// A rebuild is in progress (see `rebuild`): partial-block writes are held.
    pub(crate) rebuilding: AtomicBool,
    pub(crate) rebuild: Mutex<Option<crate::rebuild::RebuildState>>,
    pub(crate) progress: Mutex<crate::rebuild::RebuildProgress>,
    /// Former heads with writes not yet synced; the next flush syncs them.
    deferred: Mutex<Vec<File>>,
    /// A snapshot prepared and awaiting its commit.
    pub(crate) prepared: Mutex<Option<crate::snapshot::Prepared>>,
    /// Batches of a snapshot's hidden blocks punched so far (`snapshot::punch_hidden`),
    /// counted under the chain's write lock before each batch. A read the kernel does
    /// after its plan was made (`plan_read`) may have found a block in the snapshot that
    /// a write then covered in the head and the punch emptied: planned under an older
    /// count, it must be read again.
    pub(crate) punched: AtomicU64,
    /// Writes (and zeroings, punches) completed so far. Counted after the pwrite returns,
    /// so a flush that reads `n` here knows the first `n` writes are in the file.
    written: AtomicU64,
    /// The `written` count the last successful sync of the head covered. A flag set
    /// before the pwrite would let a flush clear it while the write is still on its way
    /// and the next flush skip a write that was acknowledged in between.
    synced: AtomicU64,
    /// The revision counter's `changes` the last successful sync covered.
    counter_synced: AtomicU64,
    /// Bytes written to the head since the last flush began.
    since_flush: AtomicU64,
    /// The last flush came within [`WRITE_BEHIND_MAX`] bytes of the one before: start
    /// writeback of each write as it is made (see `write_behind`).
    write_behind: AtomicBool,
    /// `volume.meta` says Dirty:false; the next write must set it again first.
    clean: AtomicBool,
    /// The `written` count when every replica last agreed: at the last clean close or
    /// the engine's last SETTLE (u64::MAX: opened dirty and neither since). Any other
    /// count means the head changed since: see `ReplicaInfo::unsettled`.
    settled_at: AtomicU64,
    /// A sync that failed, for good: Linux reports a writeback error once and marks the
    /// pages clean, so a retry "succeeds" without the data. Every later flush (and a
    /// clean close) fails with it, and `volume.meta` says Rebuilding, so no engine trusts
    /// this replica again until a rebuild (which clears it) rewrites it.
    pub(crate) sync_failed: Mutex<Option<String>>,
}

/// The revision counter: an mmap of `revision.counter`.
struct Revision {
    value: AtomicU64,
    /// Changes made to the mapping so far (from 1: what `open` read may not be on disk
    /// yet), so a flush can tell whether the counter changed since the last sync.
    changes: AtomicU64,
    map: *mut u8,
    file: File,
    lock: Mutex<u64>,
}

// The mapping is only written under `lock`, and lives as long as the Revision.
unsafe impl Send for Revision {}
unsafe impl Sync for Revision {}

impl Revision {
    fn open(dir: &Path, file: File) -> Result<Revision, MetaError> {
        let path = dir.join(meta::REVISION_COUNTER);
        let mut data = vec![0u8; meta::REVISION_COUNTER_LEN];
        let n = file.read_at(&mut data, 0).map_err(|e| MetaError::io(&path, e))?;
        let value = meta::parse_revision(&path, &data[..n])?;
        file.set_len(meta::REVISION_COUNTER_LEN as u64).map_err(|e| MetaError::io(&path, e))?;
        // SAFETY: a fresh shared mapping of a file we hold open, of the file's length.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                meta::REVISION_COUNTER_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(MetaError::io(&path, io::Error::last_os_error()));
        }
        Ok(Revision { value: AtomicU64::new(value), changes: AtomicU64::new(1), map: map as *mut u8, file, lock: Mutex::new(value) })
    }

    fn bump(&self) {
        let v = self.value.fetch_add(1, Ordering::AcqRel) + 1;
        let mut written = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if v > *written {
            let mut buf = [0u8; 24];
            let s = fmt_u64(v, &mut buf);
            // SAFETY: the mapping is REVISION_COUNTER_LEN bytes; digits of a u64 are <= 20,
            // and the trailing NUL keeps a shorter old value from showing through.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), self.map, s.len());
                *self.map.add(s.len()) = 0;
            }
            *written = v;
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::Acquire)
    }

    fn set(&self, v: u64) {
        let mut written = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.value.store(v, Ordering::Release);
        let mut buf = [0u8; meta::REVISION_COUNTER_LEN];
        meta::format_revision(v, &mut buf);
        // SAFETY: the mapping is exactly REVISION_COUNTER_LEN bytes.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.map, buf.len()) };
        *written = v;
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The count of changes: read before a sync starts, every change it counts is in
    /// the mapping, so that sync covers them.
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Puts the counter's page on its way to the disk (`wait`: and waits for that
    /// write), without a device flush: the head's fdatasync that follows ends in one
    /// (ext4 and XFS flush the device cache on every fdatasync), and a flush covers every
    /// write completed before it. One device flush per FLUSH instead of three (the
    /// head's, msync's, fdatasync's). Between flushes the page may reach the disk before
    /// the head's data, as it always could through background writeback of the mapping:
    /// the counter is trusted only as far as the last completed flush, which covers both
    /// files.
    fn write_out(&self, wait: bool) -> io::Result<()> {
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: a plain syscall on a descriptor we own.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, meta::REVISION_COUNTER_LEN as libc::off64_t, flags) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The counter alone made durable, when the head has nothing to sync.
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for Revision {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in open.
        unsafe {
            libc::munmap(self.map as *mut libc::c_void, meta::REVISION_COUNTER_LEN);
        }
    }
}

fn fmt_u64(mut v: u64, buf: &mut [u8; 24]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Ranges of `file` that hold data, from SEEK_DATA/SEEK_HOLE, rounded out to blocks.
pub(crate) fn allocated_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    Ok(data_ranges(file, 0, size, usize::MAX)?.0)
}

/// At most `max` data ranges of `file` inside `[start, end)`, rounded out to blocks and
/// clipped to the range; and whether it stopped at `max` (more may follow the last).
pub(crate) fn data_ranges(file: &File, start: u64, end: u64, max: usize) -> io::Result<(Vec<(u64, u64)>, bool)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        if out.len() == max {
            return Ok((out, true));
        }
        // SAFETY: plain lseek on an fd we own.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = (data / BLOCK * BLOCK).max(start);
        let e = (hole as u64).div_ceil(BLOCK).saturating_mul(BLOCK).min(end);
        if s < e {
            out.push((s, e));
        }
        pos = (hole as u64).max(data + 1);
    }
    Ok((out, false))
}

pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

/// Largest single write into a head file. The page cache sizes a new folio by the
/// write that creates it, and ext4 walks every block of a folio on each later write
/// into it; so after one 1 MiB write, each 4 KiB write into that MiB walks 256
/// blocks. Measured on Linux 6.18 (a 1 MiB-filled volume, 4k random writes QD32,
/// 1 replica): 45k IOPS with whole writes, 80-87k with 256 KiB pieces; a pwrite
/// loop on a plain file shows the same (9 us per 4 KiB write after 1 MiB fills, 4 us
/// after 64 KiB ones, 2 us after 4 KiB ones). 64 KiB against 256 KiB (tools/bench
/// --embedded --base, 2 rounds): 4k random writes QD32 1.5x with 3 replicas and with the
/// embedded one (CPU per request 49 -> 30 us, 3 with one embedded), QD1 10% faster,
/// 1 MiB writes 5% slower.
const WRITE_PIECE: usize = 64 * 1024;

/// Write-behind: while the client flushes at least once every this many bytes, each
/// write's writeback starts as it is made, as an O_DIRECT server's would, instead of
/// all at the flush. A client that writes more between flushes (or never flushes) keeps
/// the page cache's absorption of rewrites and its large, merged writeback. Measured
/// (tools/bench, 4k random writes QD32 with a flush every 32 writes, 1 replica): 14315
/// -> 23198 IOPS; the same without flushes fell 75089 -> 31848 with write-behind
/// always on, hence the switch.
const WRITE_BEHIND_MAX: u64 = 16 << 20;

/// Writes `data` at `offset` of a head layer in pieces of at most [`WRITE_PIECE`].
fn write_pieces(layer: &Layer, data: &[u8], offset: u64) -> io::Result<()> {
    let mut pos = offset;
    for piece in data.chunks(WRITE_PIECE) {
        layer.file.write_all_at(piece, pos).map_err(|e| io_err(layer, pos, e))?;
        pos += piece.len() as u64;
    }
    Ok(())
}

/// Reads and checks the chain `vmeta` names, opens its files (the head writable) and
/// builds the extent maps from their allocation. Writes nothing.
pub(crate) fn load_chain(dir: &Path, vmeta: &VolumeMeta) -> Result<Chain, StoreError> {
    let vm_path = dir.join(meta::VOLUME_META);
    let mut names = Vec::new();
    let mut metas = Vec::new();
    let mut cur = vmeta.head.clone();
    loop {
        if names.contains(&cur) {
            return Err(StoreError::Layout { path: dir.join(&cur), what: "the chain of Parent links loops".into() });
        }
        if names.len() >= MAX_LAYERS {
            return Err(StoreError::Layout {
                path: dir.join(&cur),
                what: format!("the chain has more than {MAX_LAYERS} layers"),
            });
        }
        let m = DiskMeta::load(dir, &cur)?;
        let parent = m.parent.clone();
        names.push(cur);
        metas.push(m);
        if parent.is_empty() {
            break;
        }
        cur = parent;
    }
    if metas[0].parent != vmeta.parent {
        return Err(StoreError::Layout {
            path: vm_path,
            what: format!("Parent {:?} disagrees with the head's Parent {:?}", vmeta.parent, metas[0].parent),
        });
    }
    names.reverse();
    let mut layers = Vec::with_capacity(names.len());
    let last = names.len() - 1;
    for name in &names {
        let path = dir.join(name);
        // Snapshots are opened writable too: a merge fills a child's holes.
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| MetaError::io(&path, e))?;
        let len = file.metadata().map_err(|e| MetaError::io(&path, e))?.len();
        // An interrupted expansion leaves files at exactly the old size (see `expand`);
        // open grows them once every check has passed.
        let unfinished = vmeta.expanding_from != 0 && len == vmeta.expanding_from;
        if len != vmeta.size && !unfinished {
            return Err(StoreError::Layout { path, what: format!("file is {len} bytes, the volume is {}", vmeta.size) });
        }
        layers.push(Layer { name: name.clone(), path, file: Arc::new(file) });
    }
    let mut maps = Maps { top: ExtentMap::new(), below: ExtentMap::new() };
    for (i, l) in layers.iter().enumerate() {
        if i == last {
            maps.below = maps.top.clone();
        }
        let ranges = allocated_ranges(&l.file, vmeta.size)
            .map_err(|e| StoreError::Io { path: l.path.clone(), offset: 0, source: e })?;
        for (s, e) in ranges {
            maps.top.insert(s, e, i as u16);
        }
    }
    Ok(Chain { layers, maps: RwLock::new(maps) })
}

/// Makes a replica directory reachable by its owner only (0700). The image files in it
/// hold the volume's data and are created with the default mode (0644 under the usual
/// umask): the directory is what keeps other local users out of them.
pub fn restrict_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

impl Store {
    /// Creates a new replica directory for `volume` of `size` bytes. The directory may
    /// exist but must not hold a replica already.
    pub fn create(dir: &Path, volume: &str, size: u64) -> Result<(), StoreError> {
        if size == 0 || size % BLOCK != 0 {
            return Err(StoreError::Layout {
                path: dir.to_path_buf(),
                what: format!("volume size {size} must be a non-zero multiple of {BLOCK}"),
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| MetaError::io(dir, e))?;
        restrict_dir(dir).map_err(|e| MetaError::io(dir, e))?;
        let vm = dir.join(meta::VOLUME_META);
        if vm.exists() {
            return Err(StoreError::Layout { path: vm, what: "a replica already exists here".into() });
        }
        let head = meta::head_name(0);
        let head_path = dir.join(&head);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&head_path)
            .map_err(|e| MetaError::io(&head_path, e))?;
        f.set_len(size).map_err(|e| MetaError::io(&head_path, e))?;
        f.sync_all().map_err(|e| MetaError::io(&head_path, e))?;
        DiskMeta {
            name: head.clone(),
            recorded_name: String::new(),
            parent: String::new(),
            removed: false,
            user_created: false,
            created: meta::now_rfc3339(),
            labels: None,
        }
        .store(dir)?;
        let mut rc = [0u8; meta::REVISION_COUNTER_LEN];
        meta::format_revision(0, &mut rc);
        meta::write_atomic(&dir.join(meta::REVISION_COUNTER), &rc)?;
        // volume.meta last: it is the commit point.
        VolumeMeta {
            size,
            head,
            dirty: false,
            rebuilding: false,
            error: String::new(),
            parent: String::new(),
            sector_size: 512,
            backing_file_path: String::new(),
            encrypted: false,
            volume_name: volume.to_string(),
            expanding_from: 0,
        }
        .store(dir)?;
        Ok(())
    }

    /// Opens a replica directory for serving. Everything is read and checked before
    /// anything is written; then the replica is marked dirty until a clean close.
    /// `volume`, when given, must match the name recorded in the directory (a directory
    /// made by Longhorn records none and adopts it).
    pub fn open(dir: &Path, volume: Option<&str>) -> Result<Store, StoreError> {
        // A tree made before directories were restricted is fixed as it is opened.
        if let Err(e) = restrict_dir(dir) {
            tracing::warn!(dir = %dir.display(), "cannot make the replica directory private (mode 0700): {e}; other local users may read the volume's data");
        }
        let mut vmeta = VolumeMeta::load(dir)?;
        let vm_path = dir.join(meta::VOLUME_META);
        if vmeta.encrypted || !vmeta.backing_file_path.is_empty() {
            return Err(StoreError::Layout {
                path: vm_path,
                what: "encrypted volumes and backing files are not supported".into(),
            });
        }
        if vmeta.size % BLOCK != 0 {
            return Err(StoreError::Layout {
                path: vm_path,
                what: format!("Size {} is not a multiple of {BLOCK}", vmeta.size),
            });
        }
        if let Some(v) = volume {
            if !vmeta.volume_name.is_empty() && vmeta.volume_name != v {
                return Err(StoreError::Layout {
                    path: vm_path,
                    what: format!("this replica belongs to volume {:?}, not {v:?}", vmeta.volume_name),
                });
            }
        }
        let chain = load_chain(dir, &vmeta)?;
        let rev_file = meta::open_revision_file(dir, false)?;
        let revision = Revision::open(dir, rev_file)?;
        // All checks passed: from here on we write.
        let was_dirty = vmeta.dirty;
        if let Some(v) = volume {
            if vmeta.volume_name.is_empty() {
                vmeta.volume_name = v.to_string();
            }
        }
        if vmeta.expanding_from != 0 {
            crate::expand::grow_layers(dir, &vmeta)?;
            vmeta.expanding_from = 0;
        }
        vmeta.dirty = true;
        vmeta.store(dir)?;
        crate::snapshot::remove_leftovers(dir, &chain);
        Ok(Store {
            dir: dir.to_path_buf(),
            volume: vmeta.volume_name.clone(),
            size: vmeta.size,
            sector_size: vmeta.sector_size,
            was_dirty,
            chain: RwLock::new(chain),
            meta: Mutex::new(vmeta),
            revision,
            rmw: Mutex::new(()),
            prepared: Mutex::new(None),
            deferred: Mutex::new(Vec::new()),
            rebuilding: AtomicBool::new(false),
            rebuild: Mutex::new(None),
            progress: Mutex::new(Default::default()),
            punched: AtomicU64::new(0),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            counter_synced: AtomicU64::new(0),
            since_flush: AtomicU64::new(0),
            write_behind: AtomicBool::new(false),
            clean: AtomicBool::new(false),
            settled_at: AtomicU64::new(if was_dirty { u64::MAX } else { 0 }),
            sync_failed: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn was_dirty(&self) -> bool {
        self.was_dirty
    }

    pub fn revision(&self) -> u64 {
        self.revision.get()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset}+{len} is beyond the volume size {}", self.size),
            ));
        }
        Ok(())
    }

    fn chain(&self) -> std::sync::RwLockReadGuard<'_, Chain> {
        self.chain.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `[offset, offset+len)` through the chain into `buf` (resized to `len`).
    pub fn read_into(&self, offset: u64, len: usize, buf: &mut BytesMut) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        let chain = self.chain();
        // SAFETY: `fill_spare` hands out `len` bytes of reserved capacity; read_raw
        // writes every one of them (file bytes or zeroes) before it returns Ok.
        unsafe { fill_spare(buf, len, |dst| read_raw(&chain, offset, dst, len)) }
    }

    /// As [`Store::read_into`], into memory the caller lends (a region of an engine's
    /// shared pool, see `shm`).
    pub fn read_to(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, dst.len() as u64)?;
        let chain = self.chain();
        // SAFETY: `dst` is valid for its length, and read_raw writes only inside it.
        unsafe { read_raw(&chain, offset, dst.as_mut_ptr(), dst.len()) }
    }

    /// As [`Store::read_cached`], into memory the caller lends.
    pub fn read_cached_to(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, dst.len() as u64)?;
        let chain = self.chain();
        // SAFETY: as in read_to.
        unsafe {
            for_segments(&chain, offset, dst.len(), dst.as_mut_ptr(), |layer, p, n, at| match layer {
                None => Ok(std::ptr::write_bytes(p, 0, n)),
                Some(l) => read_nowait(&l.file, p, n, at),
            })
        }
    }

    /// Lays out a read of `[offset, offset + len)` for the kernel to do later (see
    /// `uring`): zeroes the holes in `dst` now and lists the file pieces, each holding its
    /// file open, so the read needs neither the chain nor its lock once planned. Returns
    /// the [`Store::punched`] count the plan was made under: if it has moved by the
    /// time the data is used, the read is done again.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes; the pieces point inside it.
    pub(crate) unsafe fn plan_read(&self, offset: u64, dst: *mut u8, len: usize, pieces: &mut Vec<Piece>) -> io::Result<u64> {
        self.check_range(offset, len as u64)?;
        let chain = self.chain();
        let punched = self.punched.load(Ordering::Acquire);
        // SAFETY: passed on from the caller.
        unsafe {
            for_segments(&chain, offset, len, dst, |layer, p, n, at| {
                match layer {
                    None => std::ptr::write_bytes(p, 0, n),
                    Some(l) => pieces.push(Piece { file: l.file.clone(), dst: p, len: n, at }),
                }
                Ok(())
            })?;
        }
        Ok(punched)
    }

    /// Whether a read planned under `punched` (see [`Store::plan_read`]) may have read
    /// blocks punched since.
    pub(crate) fn punched_since(&self, punched: u64) -> bool {
        self.punched.load(Ordering::Acquire) != punched
    }

    /// Reads like [`Store::read_into`], but only from the page cache: `WouldBlock` when
    /// any part of the range would wait for the disk (nothing is waited for then, though
    /// the kernel may start reading ahead). Lets the server answer cached reads inline
    /// and send only misses to its readers, so one connection keeps several on the disk.
    pub fn read_cached(&self, offset: u64, len: usize, buf: &mut BytesMut) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        let chain = self.chain();
        // SAFETY: as in read_into; every byte is written by the kernel or zeroed.
        unsafe {
            fill_spare(buf, len, |dst| {
                for_segments(&chain, offset, len, dst, |layer, p, n, at| match layer {
                    None => Ok(std::ptr::write_bytes(p, 0, n)),
                    Some(l) => read_nowait(&l.file, p, n, at),
                })
            })
        }
    }
}

/// `len` bytes of `file` at `at`, to be read into `dst` (see [`Store::plan_read`]).
pub(crate) struct Piece {
    pub(crate) file: Arc<File>,
    pub(crate) dst: *mut u8,
    pub(crate) len: usize,
    pub(crate) at: u64,
}

/// One `preadv2(RWF_NOWAIT)`: all of `dst` from the page cache, or `WouldBlock`. A short
/// count (part cached, or the end of the file) is `WouldBlock` too: the blocking read
/// then gives the real answer.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn read_nowait(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<()> {
    let iov = libc::iovec { iov_base: dst.cast(), iov_len: len };
    // SAFETY: one iovec over `dst`, valid for `len` bytes (the caller's promise); the
    // descriptor is ours.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINTR) => io::ErrorKind::WouldBlock.into(),
            _ => e,
        });
    }
    if n as usize != len {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(())
}

/// Reads into `len` bytes of `buf`'s spare capacity and makes them its contents, without
/// zeroing them first (a 1 MiB read would otherwise pay a memset only to overwrite it).
///
/// # Safety
/// On `Ok`, `fill` must have written all `len` bytes at the pointer it is given.
unsafe fn fill_spare(buf: &mut BytesMut, len: usize, fill: impl FnOnce(*mut u8) -> io::Result<()>) -> io::Result<()> {
    buf.clear();
    buf.reserve(len);
    fill(buf.spare_capacity_mut().as_mut_ptr().cast::<u8>())?;
    // SAFETY: capacity >= len (reserved), and all len bytes were written (the caller's
    // promise for Ok).
    unsafe { buf.set_len(len) };
    Ok(())
}

/// Calls `f(layer, dst, n, file_offset)` for each piece of `[offset, offset + len)` in the
/// chain, `None` for a hole (and for any gap the map leaves, so every byte of `dst` is
/// written exactly once whatever the map says).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes; `f` gets pointers inside it.
unsafe fn for_segments(
    chain: &Chain,
    offset: u64,
    len: usize,
    dst: *mut u8,
    mut f: impl FnMut(Option<&Layer>, *mut u8, usize, u64) -> io::Result<()>,
) -> io::Result<()> {
    let end = offset + len as u64;
    let mut pos = offset;
    for seg in chain.segments(offset, end) {
        let (start, stop) = (seg.start.max(pos), seg.end.min(end));
        if stop <= start {
            continue;
        }
        if start > pos {
            // SAFETY: [pos, start) is inside [offset, end).
            f(None, unsafe { dst.add((pos - offset) as usize) }, (start - pos) as usize, pos)?;
        }
        let layer = seg.layer.map(|l| &chain.layers[l as usize]);
        // SAFETY: [start, stop) is inside [offset, end).
        f(layer, unsafe { dst.add((start - offset) as usize) }, (stop - start) as usize, start)?;
        pos = stop;
    }
    if pos < end {
        // SAFETY: [pos, end) is inside [offset, end).
        f(None, unsafe { dst.add((pos - offset) as usize) }, (end - pos) as usize, pos)?;
    }
    Ok(())
}

/// `pread` until `len` bytes are in, as `read_exact_at` but into raw memory.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn pread_exact(file: &File, dst: *mut u8, len: usize, offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: the rest of `dst` is valid for writes (the caller's promise).
        let n = unsafe { libc::pread(file.as_raw_fd(), dst.add(done).cast(), len - done, (offset + done as u64) as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads `[offset, offset + len)` of the chain into raw memory: every byte written.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes.
unsafe fn read_raw(chain: &Chain, offset: u64, dst: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: passed on from the caller.
    unsafe {
        for_segments(chain, offset, len, dst, |layer, p, n, at| match layer {
            None => Ok(std::ptr::write_bytes(p, 0, n)),
            Some(l) => pread_exact(&l.file, p, n, at).map_err(|e| io_err(l, at, e)),
        })
    }
}

pub(crate) fn io_err(layer: &Layer, offset: u64, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{} at offset {offset}: {e}", layer.path.display()))
}

/// Reads through the chain.
pub(crate) fn read_at(chain: &Chain, offset: u64, out: &mut [u8]) -> io::Result<()> {
    // SAFETY: `out` is valid for writes of its length.
    unsafe { read_raw(chain, offset, out.as_mut_ptr(), out.len()) }
}

impl Store {

    /// Writes `data` at `offset` to the head.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let chain = self.chain();
        if self.rebuilding.load(Ordering::Acquire) {
            if let Some((a, b)) = self.hold_edges(offset, data)? {
                self.write_head(&chain, a, &data[(a - offset) as usize..(b - offset) as usize])?;
            }
        } else {
            self.write_locked(&chain, offset, data)?;
        }
        self.revision.bump();
        Ok(())
    }

    pub(crate) fn set_revision(&self, v: u64) {
        self.revision.set(v);
    }

    /// The write path, given the chain (read- or write-locked by the caller).
    pub(crate) fn write_locked(&self, chain: &Chain, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = offset + data.len() as u64;
        if offset % BLOCK == 0 && end % BLOCK == 0 {
            self.write_head(chain, offset, data)
        } else {
            self.write_widened(chain, offset, data)
        }
    }

    /// Before the first write after a clean close, records Dirty again.
    fn dirty(&self) -> io::Result<()> {
        if self.clean.load(Ordering::Acquire) {
            let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            if self.clean.load(Ordering::Acquire) {
                m.dirty = true;
                m.store(&self.dir).map_err(|e| io::Error::other(e.to_string()))?;
                self.clean.store(false, Ordering::Release);
            }
        }
        Ok(())
    }

    /// Starts writeback of a write just made, while the client flushes often (see
    /// [`WRITE_BEHIND_MAX`]): the device works on it while the next writes arrive, and
    /// the flush that follows waits for less. It waits for nothing itself; an error here
    /// shows again at the flush, which is what reports it.
    fn write_behind(&self, head: &Layer, offset: u64, len: u64) {
        let since = self.since_flush.fetch_add(len, Ordering::Relaxed) + len;
        if !self.write_behind.load(Ordering::Relaxed) {
            return;
        }
        if since > WRITE_BEHIND_MAX {
            self.write_behind.store(false, Ordering::Relaxed);
            return;
        }
        // SAFETY: a plain syscall on a descriptor the layer owns.
        let r = unsafe {
            libc::sync_file_range(head.file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r != 0 {
            tracing::debug!(path = %head.path.display(), offset, "write-behind: {}", io::Error::last_os_error());
        }
    }

    /// Counts a change to the head as done (its pwrite or punch has returned).
    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    fn write_head(&self, chain: &Chain, offset: u64, data: &[u8]) -> io::Result<()> {
        let head = chain.head();
        self.dirty()?;
        crate::fault::slow_write(offset);
        write_pieces(head, data, offset)?;
        self.write_behind(head, offset, data.len() as u64);
        self.wrote();
        chain.maps_mut().top.insert(offset, offset + data.len() as u64, chain.head_index());
        Ok(())
    }

    /// A write that covers part of a block: widen it to whole blocks with the blocks'
    /// current content, so the head holds whole, correct blocks.
    fn write_widened(&self, chain: &Chain, offset: u64, data: &[u8]) -> io::Result<()> {
        let _g = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset + data.len() as u64;
        let ws = offset / BLOCK * BLOCK;
        let we = end.div_ceil(BLOCK) * BLOCK;
        let mut buf = vec![0u8; (we - ws) as usize];
        // Only the partial edge blocks need their old content.
        let first_block_end = (ws + BLOCK).min(we);
        read_at(chain, ws, &mut buf[..(first_block_end - ws) as usize])?;
        if we - BLOCK > ws {
            let lo = (we - BLOCK - ws) as usize;
            read_at(chain, we - BLOCK, &mut buf[lo..])?;
        }
        buf[(offset - ws) as usize..(end - ws) as usize].copy_from_slice(data);
        self.write_head(chain, ws, &buf)
    }

    /// Makes `[offset, offset+len)` read as zeros: real zero blocks over older data,
    /// holes elsewhere.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let chain = self.chain();
        let (a, b) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        if self.rebuilding.load(Ordering::Acquire) {
            // Older layers are not here yet: zeros are written as data everywhere.
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(ZEROS.len() as u64) as usize;
                if let Some((x, y)) = self.hold_edges(pos, &ZEROS[..n])? {
                    self.write_head(&chain, x, &ZEROS[..(y - x) as usize])?;
                }
                pos += n as u64;
            }
            self.revision.bump();
            return Ok(());
        }
        if a >= b {
            self.write_widened(&chain, offset, &ZEROS[..len as usize])?;
        } else {
            if offset < a {
                self.write_widened(&chain, offset, &ZEROS[..(a - offset) as usize])?;
            }
            if b < end {
                self.write_widened(&chain, b, &ZEROS[..(end - b) as usize])?;
            }
            self.zero_aligned(&chain, a, b, true)?;
        }
        self.revision.bump();
        Ok(())
    }

    /// Discards `[offset, offset+len)` where that cannot uncover older data.
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let (a, b) = (offset.div_ceil(BLOCK) * BLOCK, (offset + len) / BLOCK * BLOCK);
        // While rebuilding the layers below are unknown; a trim may leave data as is.
        if a < b && !self.rebuilding.load(Ordering::Acquire) {
            self.zero_aligned(&self.chain(), a, b, false)?;
        }
        self.revision.bump();
        Ok(())
    }

    /// Block-aligned zeroing. Where an older layer holds data: zero blocks if `must_zero`
    /// (else left alone); elsewhere the head's blocks are punched out.
    fn zero_aligned(&self, chain: &Chain, a: u64, b: u64, must_zero: bool) -> io::Result<()> {
        crate::fault::slow_zero(b - a);
        let pieces = chain.maps.read().unwrap_or_else(|p| p.into_inner()).below.lookup(a, b);
        let head = chain.head();
        self.dirty()?;
        for p in pieces {
            if p.layer.is_some() {
                if must_zero {
                    let mut pos = p.start;
                    while pos < p.end {
                        let n = (p.end - pos).min(ZEROS.len() as u64);
                        write_pieces(head, &ZEROS[..n as usize], pos)?;
                        pos += n;
                    }
                    chain.maps_mut().top.insert(p.start, p.end, chain.head_index());
                }
            } else {
                punch_hole(&head.file, p.start, p.end - p.start).map_err(|e| io_err(head, p.start, e))?;
                chain.maps_mut().top.remove(p.start, p.end);
            }
        }
        self.wrote();
        Ok(())
    }

    /// Allocation of `[offset, offset+len)` across the chain: (length, is_hole) runs.
    pub fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u32, bool)>> {
        self.check_range(offset, len)?;
        let mut out: Vec<(u32, bool)> = Vec::new();
        for s in self.chain().segments(offset, offset + len) {
            let hole = s.layer.is_none();
            let n = (s.end - s.start) as u32;
            match out.last_mut() {
                Some(last) if last.1 == hole => last.0 += n,
                _ => out.push((n, hole)),
            }
        }
        Ok(out)
    }

    /// Puts every acknowledged write on stable storage.
    pub fn flush(&self) -> io::Result<()> {
        self.flush_chain(&self.chain())
    }

    /// Hands `file` (a head being rotated out) to the next flush, if it has unsynced
    /// writes. The caller holds the chain's write lock, so no write is in progress.
    pub(crate) fn defer_sync(&self, file: &File) -> io::Result<()> {
        if self.written.load(Ordering::Acquire) != self.synced.load(Ordering::Acquire) {
            let f = file.try_clone()?;
            self.deferred.lock().unwrap_or_else(|p| p.into_inner()).push(f);
        }
        Ok(())
    }

    fn flush_chain(&self, chain: &Chain) -> io::Result<()> {
        if let Some(why) = self.sync_failed.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(io::Error::other(format!("an earlier sync failed ({why}): writes before it may not be on disk; this replica must be rebuilt")));
        }
        self.sync_all(chain).inspect_err(|e| self.sync_broke(e))
    }

    /// Latches a failed sync (see `sync_failed`) and records it in `volume.meta`.
    fn sync_broke(&self, e: &io::Error) {
        *self.sync_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = m.clone();
        next.rebuilding = true;
        next.dirty = true;
        match next.store(&self.dir) {
            Ok(()) => {
                *m = next;
                self.clean.store(false, Ordering::Release);
            }
            Err(e2) => tracing::error!(dir = %self.dir.display(), "cannot record the failed sync in volume.meta: {e2}"),
        }
        tracing::error!(dir = %self.dir.display(), "sync failed: {e}; this replica now refuses every flush until it is rebuilt");
    }

    fn sync_all(&self, chain: &Chain) -> io::Result<()> {
        let since = self.since_flush.swap(0, Ordering::Relaxed);
        self.write_behind.store(since <= WRITE_BEHIND_MAX, Ordering::Relaxed);
        // Read before any sync starts: every write counted here has returned from its
        // pwrite, so the syncs below cover it.
        let upto = self.written.load(Ordering::Acquire);
        let changes = self.revision.changes();
        let deferred: Vec<File> = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        // Nothing changed since the last sync that succeeded: every write acknowledged
        // so far is on stable storage already, and a sync would cost a device flush for
        // nothing (ext4 flushes the device on every fdatasync, dirty or not). Clients
        // flush back to back (fio's --fsync with a queue depth: most flushes follow
        // another with no write between); qemu's block layer skips these the same way.
        if deferred.is_empty() && self.synced_at(upto, changes) {
            return Ok(());
        }
        for (i, f) in deferred.iter().enumerate() {
            if let Err(e) = f.sync_data() {
                // Keep the ones not yet synced for the next try.
                let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
                for g in &deferred[i..] {
                    if let Ok(g) = g.try_clone() {
                        d.push(g);
                    }
                }
                return Err(io::Error::new(e.kind(), format!("syncing a snapshot layer: {e}")));
            }
        }
        let counter_err = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", self.dir.join(meta::REVISION_COUNTER).display()));
        if upto != self.synced.load(Ordering::Acquire) {
            let head = chain.head();
            crate::fault::sync_fails().map_err(|e| io_err(head, 0, e))?;
            // The counter's write and the head's run side by side; the counter's must
            // have completed before the head's fdatasync flushes the device.
            self.revision.write_out(false).map_err(counter_err)?;
            // SAFETY: a plain syscall on a descriptor the layer owns.
            if unsafe { libc::sync_file_range(head.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) } != 0 {
                return Err(io_err(head, 0, io::Error::last_os_error()));
            }
            self.revision.write_out(true).map_err(counter_err)?;
            head.file.sync_data().map_err(|e| io_err(head, 0, e))?;
            self.synced.fetch_max(upto, Ordering::AcqRel);
            self.counter_synced.fetch_max(changes, Ordering::AcqRel);
            return Ok(());
        }
        self.revision.sync().map_err(counter_err)?;
        self.counter_synced.fetch_max(changes, Ordering::AcqRel);
        Ok(())
    }

    /// Whether the last successful sync covered `upto` writes and `changes` of the
    /// revision counter.
    fn synced_at(&self, upto: u64, changes: u64) -> bool {
        upto == self.synced.load(Ordering::Acquire) && changes == self.counter_synced.load(Ordering::Acquire)
    }

    /// Whether a flush now would have anything to put on stable storage.
    #[cfg(test)]
    fn unsynced(&self) -> bool {
        !self.deferred.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            || !self.synced_at(self.written.load(Ordering::Acquire), self.revision.changes())
    }

    /// The engine vouches that every write this replica took is on the others too
    /// (see `proto`'s SETTLE): settled until the next write.
    pub fn settle(&self) {
        self.settled_at.store(self.written.load(Ordering::Acquire), Ordering::Release);
    }

    /// Flushes and records a clean close (Dirty:false). A later write marks the replica
    /// dirty again, so an engine may close and another reopen the same replica.
    pub fn close(&self) -> Result<(), StoreError> {
        // The write lock holds off I/O, so nothing lands between the flush and Dirty:false.
        let chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        self.flush_chain(&chain).map_err(|e| StoreError::Io { path: self.dir.clone(), offset: 0, source: e })?;
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        m.dirty = false;
        m.store(&self.dir)?;
        self.clean.store(true, Ordering::Release);
        self.settled_at.store(self.written.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    pub fn info(&self, mode: &str) -> ReplicaInfo {
        let mut i = self.info_inner(mode);
        i.head_has_data = self.head_has_data();
        i
    }

    fn info_inner(&self, mode: &str) -> ReplicaInfo {
        // Lock order is chain, then meta (chain changes hold both): take the chain first.
        let chain: Vec<String> = self.chain().layers.iter().rev().map(|l| l.name.clone()).collect();
        let m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        ReplicaInfo {
            volume: self.volume.clone(),
            size: self.size,
            sector_size: self.sector_size,
            revision: self.revision.get(),
            was_dirty: self.was_dirty,
            unsettled: self.settled_at.load(Ordering::Acquire) != self.written.load(Ordering::Acquire),
            head: m.head.clone(),
            parent: m.parent.clone(),
            chain,
            mode: mode.to_string(),
            rebuilding: m.rebuilding,
            progress: Some(self.rebuild_progress()).filter(|p| p.bytes_total > 0 || p.active || !p.error.is_empty()),
            head_has_data: false,
            shared_writes: false,
            mac: String::new(),
        }
    }

    /// Number of extents in the index (how fragmented the volume is).
    pub fn extent_count(&self) -> usize {
        self.chain().maps.read().unwrap_or_else(|p| p.into_inner()).top.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flush skips its syncs only when nothing changed since the last one that
    /// succeeded; every kind of change makes the next flush sync.
    #[test]
    fn a_flush_syncs_whatever_changed_since_the_last() {
        let tmp = std::env::temp_dir().join(format!("lh-store-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        Store::create(&tmp, "v", 1 << 20).expect("create");
        let s = Store::open(&tmp, Some("v")).expect("open");
        // What open read of the counter may be in the page cache only.
        assert!(s.unsynced(), "a fresh open must sync at its first flush");
        s.flush().expect("flush");
        assert!(!s.unsynced());
        s.write(4096, &[7u8; 4096]).expect("write");
        assert!(s.unsynced(), "a write must be synced");
        s.flush().expect("flush");
        assert!(!s.unsynced());
        // A trim inside one block changes no file but the revision counter.
        s.trim(100, 10).expect("trim");
        assert!(s.unsynced(), "a change of the revision counter alone must be synced");
        s.flush().expect("flush");
        assert!(!s.unsynced());
        s.set_revision(1000);
        assert!(s.unsynced(), "a counter set by a rebuild must be synced");
        s.flush().expect("flush");
        assert!(!s.unsynced());
        s.flush().expect("a flush with nothing to do succeeds");
        let mut b = BytesMut::new();
        s.read_into(4096, 4096, &mut b).expect("read");
        assert_eq!(&b[..], &[7u8; 4096][..]);
        drop(s);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
