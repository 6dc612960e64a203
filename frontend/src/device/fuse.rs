//! `--frontend fuse`: the volume as one file in a FUSE mount, attached to a loop device
//! with direct I/O. The block device for kernels with neither NBD nor ublk.
//!
//! Path of a request: filesystem -> /dev/loopN -> (direct I/O, async) -> FUSE file ->
//! this module -> engine `Session`. Requests are not waited on: each FUSE request is
//! submitted to the engine with a tag and answered from the engine's completion
//! callback, so any number of them are in flight with a few FUSE reader threads.
//! The mount asks the kernel for async direct I/O (so the loop driver's requests
//! overlap), parallel direct writes, 1 MiB requests and a deep background queue.

use super::loopdev::LoopDevice;
use super::{Ctx, DeviceConfig, DeviceError, Result};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, WriteFlags,
};
use longhorn_engine::api::{Completer, IoOp, IoResult, Session};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::{debug, info, warn};

const FILE_INO: u64 = 2;
/// The loop device's logical block size; also what statfs reports, which the loop
/// driver takes as its discard granularity.
const BLOCK: u32 = 4096;
/// Threads reading /dev/fuse (each with its own cloned fd). Replies come from engine
/// threads, so these only read and submit.
const FUSE_THREADS: usize = 2;
/// Largest extent one engine request covers: the engine takes any length, but a
/// fallocate of a huge range is split so no one request runs long.
const MAX_CHUNK: u64 = 1 << 30;

pub fn probe() -> std::result::Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (no FUSE in this kernel, or not in this container)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("/dev/loop-control is missing (no loop driver)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.lines().any(|l| l.split_whitespace().last() == Some("fuse")) {
        return Err("the kernel does not list `fuse` in /proc/filesystems".into());
    }
    Ok(())
}

/// A reply the kernel waits for, kept until the engine completes the request.
enum Pending {
    Data(ReplyData),
    Write(ReplyWrite, u32),
    Empty(ReplyEmpty),
    /// One part of a request split into several engine requests.
    Part(Arc<Joint>),
}

/// A split request: answered once, when its last part completes.
struct Joint {
    state: Mutex<(usize, Option<i32>, Option<ReplyEmpty>)>,
}

impl Joint {
    fn done(&self, err: Option<i32>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if s.1.is_none() {
            s.1 = err;
        }
        if s.0 == 0 {
            if let Some(r) = s.2.take() {
                match s.1 {
                    None => r.ok(),
                    Some(e) => r.error(Errno::from_i32(e)),
                }
            }
        }
    }
}

/// Replies waiting for the engine, by tag. Sharded so FUSE threads and engine
/// threads rarely meet on one lock.
struct Waiting {
    shards: Vec<Mutex<HashMap<u64, Pending>>>,
    next: AtomicU64,
}

const SHARDS: usize = 16;

impl Waiting {
    fn put(&self, p: Pending) -> u64 {
        let tag = self.next.fetch_add(1, Ordering::Relaxed);
        self.shards[tag as usize % SHARDS].lock().unwrap_or_else(|e| e.into_inner()).insert(tag, p);
        tag
    }

    fn take(&self, tag: u64) -> Option<Pending> {
        self.shards[tag as usize % SHARDS].lock().unwrap_or_else(|e| e.into_inner()).remove(&tag)
    }
}

impl Completer for Waiting {
    fn complete(&self, tag: u64, result: IoResult) {
        let Some(p) = self.take(tag) else {
            warn!(tag, "engine completed a request nobody waits for");
            return;
        };
        let err = match &result {
            IoResult::Err(e) => Some(*e),
            _ => None,
        };
        match (p, result) {
            (Pending::Data(r), IoResult::Data(d)) => r.data(&d),
            (Pending::Data(r), IoResult::Err(e)) => r.error(Errno::from_i32(e)),
            (Pending::Data(r), _) => r.error(Errno::EIO),
            (Pending::Write(r, n), IoResult::Done) => r.written(n),
            (Pending::Write(r, _), IoResult::Err(e)) => r.error(Errno::from_i32(e)),
            (Pending::Write(r, _), _) => r.error(Errno::EIO),
            (Pending::Empty(r), IoResult::Done) => r.ok(),
            (Pending::Empty(r), IoResult::Err(e)) => r.error(Errno::from_i32(e)),
            (Pending::Empty(r), _) => r.error(Errno::EIO),
            (Pending::Part(j), _) => j.done(err),
        }
    }

    fn flush(&self) {}
}

/// The filesystem: a root directory holding one file, the volume.
struct VolumeFs {
    name: String,
    size: u64,
    session: Box<dyn Session>,
    waiting: Arc<Waiting>,
    started: SystemTime,
}

impl VolumeFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            1 => (FileType::Directory, 0o755, 0, 2),
            FILE_INO => (FileType::RegularFile, 0o600, self.size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size / 512,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            flags: 0,
            blksize: BLOCK,
        })
    }

    fn submit(&self, p: Pending, op: IoOp) {
        let tag = self.waiting.put(p);
        self.session.submit(tag, op);
        self.session.push();
    }

    /// Zeroes [offset, offset+len) in chunks the engine takes, answering once.
    fn zero_range(&self, offset: u64, len: u64, reply: ReplyEmpty) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            reply.ok();
            return;
        }
        let parts = (end - offset).div_ceil(MAX_CHUNK) as usize;
        let joint = Arc::new(Joint { state: Mutex::new((parts, None, Some(reply))) });
        let mut off = offset;
        while off < end {
            let n = (end - off).min(MAX_CHUNK);
            let tag = self.waiting.put(Pending::Part(joint.clone()));
            self.session.submit(tag, IoOp::WriteZeroes { offset: off, len: n as u32, fua: false });
            off += n;
        }
        self.session.push();
    }
}

const TTL: Duration = Duration::from_secs(3600);

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Async direct I/O lets the loop driver keep many requests in flight on one
        // file; without it each one blocks a loop worker until answered.
        for f in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_PARALLEL_DIROPS] {
            if let Err(missing) = config.add_capabilities(f) {
                info!(volume = %self.name, "FUSE kernel lacks {missing:?}");
            }
        }
        // Async direct I/O requests are FUSE "background" requests: the default limit
        // (12) would cap the queue depth.
        let _ = config.set_max_background(256);
        let _ = config.set_congestion_threshold(192);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent.0, self.attr(FILE_INO)) {
            (1, Some(a)) if name == OsStr::new(&self.name) => reply.entry(&TTL, &a, fuser::Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The volume's size is fixed; an open with O_TRUNC must not pretend to truncate.
        if size.is_some_and(|s| s != self.size) {
            reply.error(Errno::EPERM);
            return;
        }
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        // No page cache in front of the volume (the loop device has its own), and
        // direct writes to the one file may run in parallel.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if offset >= self.size || size == 0 {
            reply.data(&[]);
            return;
        }
        let len = (size as u64).min(self.size - offset) as u32;
        self.submit(Pending::Data(reply), IoOp::Read { offset, len });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset.saturating_add(data.len() as u64) > self.size {
            reply.error(Errno::ENOSPC);
            return;
        }
        if data.is_empty() {
            reply.written(0);
            return;
        }
        // O_SYNC/O_DSYNC opens get FUA writes (the loop driver itself flushes instead).
        let fua = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        let n = data.len() as u32;
        self.submit(Pending::Write(reply, n), IoOp::Write { offset, data: crate::device::write_data(self.session.as_ref(), data), fua });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close(2): nothing to do, durability is fsync's business.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.submit(Pending::Empty(reply), IoOp::Flush);
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        // The loop driver turns DISCARD into PUNCH_HOLE and WRITE_ZEROES into
        // ZERO_RANGE (or PUNCH_HOLE); both must read back as zeros afterwards, which is
        // the engine's WriteZeroes (it punches holes where no older layer needs data).
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let rest = mode & !(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE);
        if rest != 0 {
            reply.error(Errno::EOPNOTSUPP);
        } else if punch || zero {
            self.zero_range(offset, length, reply);
        } else if offset.saturating_add(length) <= self.size {
            // Plain preallocation inside the volume: every block already exists.
            reply.ok();
        } else {
            reply.error(Errno::ENOSPC);
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != 1 {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [(1u64, FileType::Directory, "."), (1, FileType::Directory, ".."), (FILE_INO, FileType::RegularFile, self.name.as_str())];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        // ENOSYS once makes the kernel stop asking (it checks security.capability
        // before every write otherwise: one round trip per write).
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size / BLOCK as u64;
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK);
    }
}

/// A volume mounted as a FUSE file and attached to a loop device.
pub struct FuseDevice {
    volume: String,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
    lo: Option<LoopDevice>,
}

impl FuseDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<FuseDevice> {
        let mountpoint = cfg.run_dir.join(format!("{}.fuse", cfg.volume));
        // A mount left by an engine that was killed is dead (ENOTCONN): clear it.
        // mountinfo names it by its canonical path, which a run dir given with `..`
        // or through a symlink is not.
        let listed = cfg.run_dir.canonicalize().map(|d| d.join(format!("{}.fuse", cfg.volume))).unwrap_or_else(|_| mountpoint.clone());
        if let Some(_mp) = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|t| t.lines().find(|l| l.split(' ').nth(4) == Some(&*listed.to_string_lossy())).map(str::to_string))
        {
            warn!(mount = %mountpoint.display(), "unmounting a stale FUSE mount of a previous engine");
            lazy_umount(&mountpoint);
        }
        std::fs::create_dir_all(&mountpoint).ctx(|| format!("creating FUSE mount point {}", mountpoint.display()))?;
        let waiting = Arc::new(Waiting { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(), next: AtomicU64::new(1) });
        let session = cfg
            .backend
            .open_session(waiting.clone())
            .ctx(|| format!("volume {}: opening an engine session for FUSE", cfg.volume))?;
        let fs = VolumeFs { name: cfg.volume.clone(), size: cfg.backend.size(), session, waiting, started: SystemTime::now() };
        let mut fcfg = Config::default();
        fcfg.mount_options = vec![
            MountOption::FSName(format!("longhorn:{}", cfg.volume)),
            MountOption::Subtype("longhorn".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        fcfg.n_threads = Some(FUSE_THREADS);
        fcfg.clone_fd = true;
        let session = fuser::Session::new(fs, &mountpoint, &fcfg)
            .ctx(|| format!("volume {}: mounting FUSE on {}", cfg.volume, mountpoint.display()))?
            .spawn()
            .ctx(|| format!("volume {}: starting the FUSE threads", cfg.volume))?;
        let mut dev = FuseDevice { volume: cfg.volume.clone(), mountpoint, session: Some(session), lo: None };
        let file = dev.mountpoint.join(&cfg.volume);
        let lo = LoopDevice::attach(&file, BLOCK, &format!("longhorn:{}", cfg.volume))
            .map_err(|e| DeviceError::Unsupported(format!("volume {}: loop device for {}: {e}", cfg.volume, file.display())))?;
        info!(volume = %cfg.volume, file = %file.display(), device = %lo.path().display(), "FUSE file attached to a loop device with direct I/O");
        dev.lo = Some(lo);
        Ok(dev)
    }

    pub fn loop_path(&self) -> PathBuf {
        self.lo.as_ref().map(|l| l.path()).unwrap_or_default()
    }

    /// Flushes through the loop device, detaches it, unmounts the FUSE file.
    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let mut res = Ok(());
        let mut released = true;
        if let Some(lo) = self.lo.take() {
            if let Err(e) = super::flush_blockdev(&lo.path()) {
                warn!(volume = %self.volume, "flushing before detach: {e}");
                res = Err(e);
            }
            if let Err(e) = lo.detach() {
                warn!(volume = %self.volume, "{e}");
                released = false;
                if res.is_ok() {
                    res = Err(e);
                }
            }
        }
        if let Some(s) = self.session.take() {
            debug!(volume = %self.volume, "unmounting {}", self.mountpoint.display());
            if released {
                // Unmounting ends the FUSE connection; joining waits for the reader
                // threads, so no request is left unanswered when the engine closes.
                if let Err(e) = s.umount_and_join() {
                    warn!(volume = %self.volume, "unmounting {}: {e}; detaching it lazily", self.mountpoint.display());
                    lazy_umount(&self.mountpoint);
                }
            } else {
                // The loop device still holds the file (a forced stop while mounted):
                // detach the mount lazily and do not wait for it.
                lazy_umount(&self.mountpoint);
                std::mem::forget(s);
            }
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        res
    }
}

impl Drop for FuseDevice {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!(volume = %self.volume, "FUSE device teardown: {e}");
        }
    }
}

fn lazy_umount(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
