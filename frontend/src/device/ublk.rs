//! `--frontend ublk`: the kernel's ublk driver (`/dev/ublkbN`) served by this process
//! through the `libublk` crate.
//!
//! One ublk queue per CPU, each served by its own thread with its own io_uring and its
//! own engine [`Session`]; every queue has [`DEPTH`] tags, so that many requests per
//! queue are in flight in the engine at once. A queue thread never waits for the
//! engine: a new request (a CQE of the ublk FETCH/COMMIT command) is submitted to the
//! session tagged with its ublk tag and the thread goes back to its ring. The engine
//! completes from its replica threads into a per-queue list and, on
//! [`Completer::flush`], writes the queue's eventfd; a POLL on that eventfd sits in the
//! queue's io_uring, so the queue thread wakes up, drains the list, copies read data
//! into the tags' buffers and commits the results to the driver (which fetches the
//! next request with the same command).
//!
//! The device declares a volatile write cache and FUA, so FLUSH and FUA writes reach
//! the engine (a write that arrives empty is a flush); DISCARD becomes a Trim and
//! WRITE_ZEROES a WriteZeroes, both up to 1 GiB per request.
//! Detaching flushes the device, stops it (the driver drains in-flight requests,
//! then aborts the queues' commands, which ends the queue threads) and deletes it.

use super::{DeviceConfig, DeviceError, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use longhorn_engine::api::{BlockBackend, Completer, IoOp, IoResult, Session};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

const CONTROL: &str = "/dev/ublk-control";
/// Tags (requests in flight) per queue.
const DEPTH: u16 = 128;
/// Largest read/write request (and each tag's buffer).
const IO_BUF_BYTES: u32 = 512 << 10;
/// Longest Trim or WriteZeroes sent as one request: the engine takes any length (it
/// works through long ones in 16 MiB pieces, each under the I/O timeout); this bounds
/// how long one request may take as a whole.
const MAX_RANGE: u32 = 1 << 30;
/// Discard granularity (the engine's block).
const BLOCK: u32 = 4096;
/// The io_uring user_data tag of the eventfd POLL (ublk tags are below the depth).
const EVENT_TAG: u16 = u16::MAX;
/// How long attaching waits for the driver to bring the device up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long detaching waits for the queue threads to end after the stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the kernel has what this frontend needs; the error says what is missing.
pub fn probe() -> std::result::Result<(), String> {
    if !Path::new(CONTROL).exists() {
        let loaded = Path::new("/sys/module/ublk_drv").exists();
        return Err(if loaded {
            format!("the ublk driver is loaded but {CONTROL} is missing (no devtmpfs/udev node?)")
        } else {
            format!("the kernel has no ublk driver (no {CONTROL}, no /sys/module/ublk_drv: needs Linux 6.0+ with CONFIG_BLK_DEV_UBLK; try `modprobe ublk_drv`)")
        });
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(CONTROL) {
        return Err(format!("cannot open {CONTROL}: {e} (creating ublk devices needs root)"));
    }
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err("io_uring is disabled (kernel.io_uring_disabled=2); ublk needs it".into());
        }
    }
    Ok(())
}

/// Names of the driver feature bits that matter here, for the log.
fn describe_features(f: u64) -> String {
    let names = [
        (sys::UBLK_F_SUPPORT_ZERO_COPY as u64, "zero-copy"),
        (sys::UBLK_F_USER_RECOVERY as u64, "user-recovery"),
        (sys::UBLK_F_CMD_IOCTL_ENCODE as u64, "ioctl-encode"),
        (sys::UBLK_F_USER_COPY as u64, "user-copy"),
        (sys::UBLK_F_UPDATE_SIZE as u64, "update-size"),
        (sys::UBLK_F_AUTO_BUF_REG as u64, "auto-buf-reg"),
        (sys::UBLK_F_QUIESCE as u64, "quiesce"),
        (sys::UBLK_F_PER_IO_DAEMON as u64, "per-io-daemon"),
    ];
    let have: Vec<&str> = names.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect();
    format!("{f:#x} ({})", have.join(" "))
}

/// A volume served as `/dev/ublkbN`.
pub struct UblkDevice {
    volume: String,
    dev_id: u32,
    /// The thread running the libublk target (it owns the control device and joins
    /// the queue threads); ends when the device is stopped.
    server: Option<std::thread::JoinHandle<()>>,
}

/// What a queue thread needs, made before the device is started so that a queue
/// thread has nothing left that can fail before it fetches requests.
struct QueueSetup {
    session: Box<dyn Session>,
    done: Arc<QueueDone>,
}

impl UblkDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<UblkDevice> {
        let vol = cfg.volume.clone();
        let size = cfg.backend.size();
        if size == 0 || !size.is_multiple_of(512) {
            return Err(DeviceError::Unsupported(format!("volume {vol}: size {size} is not a multiple of 512 bytes; ublk cannot expose it")));
        }
        match UblkCtrl::get_features() {
            Some(f) => info!(volume = %vol, "ublk driver features {}", describe_features(f)),
            None => info!(volume = %vol, "the ublk driver does not report features (Linux < 6.5); using the basic interface"),
        }
        let nr_queues = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 64) as u16;

        // Sessions and eventfds for every queue, up front.
        let mut setups = Vec::with_capacity(nr_queues as usize);
        for q in 0..nr_queues {
            let done = QueueDone::new().map_err(|e| DeviceError::io(format!("volume {vol}: eventfd for ublk queue {q}"), e))?;
            let session = cfg
                .backend
                .open_session(done.clone())
                .map_err(|e| DeviceError::io(format!("volume {vol}: opening an engine session for ublk queue {q}"), e))?;
            setups.push(Some(QueueSetup { session, done }));
        }
        let setups = Arc::new(Mutex::new(setups));

        let (tx, rx) = mpsc::sync_channel::<std::result::Result<u32, String>>(2);
        let backend = cfg.backend.clone();
        let server = std::thread::Builder::new()
            .name(format!("ublk-{vol}"))
            .spawn({
                let vol = vol.clone();
                move || serve(vol, backend, nr_queues, setups, tx)
            })
            .map_err(|e| DeviceError::io(format!("volume {vol}: starting the ublk server thread"), e))?;

        let dev_id = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(id)) => id,
            Ok(Err(msg)) => {
                let _ = server.join();
                return Err(DeviceError::Unsupported(format!("volume {vol}: ublk device not started: {msg}")));
            }
            Err(_) => {
                // Leave the thread (it may be stuck in the driver); say so.
                return Err(DeviceError::Unsupported(format!(
                    "volume {vol}: the ublk device did not start within {START_TIMEOUT:?} (see the log of thread ublk-{vol})"
                )));
            }
        };
        let dev = UblkDevice { volume: vol.clone(), dev_id, server: Some(server) };
        // devtmpfs (or udev) makes the node; wait for it.
        let t = Instant::now();
        while !dev.path().exists() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(DeviceError::Unsupported(format!("volume {vol}: ublk device {dev_id} started but {} did not appear", dev.path().display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        info!(volume = %vol, device = %dev.path().display(), queues = nr_queues, depth = DEPTH, max_io = IO_BUF_BYTES, "ublk device started");
        Ok(dev)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(server) = self.server.take() else { return Ok(()) };
        let path = self.path();
        let flushed = if path.exists() { super::flush_blockdev(&path) } else { Ok(()) };
        // STOP_DEV: the driver removes the disk (waiting for requests in flight, which
        // the queue threads still serve), then aborts the queues' commands.
        let stopped = UblkCtrl::new_simple(self.dev_id as i32)
            .and_then(|c| c.kill_dev())
            .map(|_| ())
            .map_err(|e| DeviceError::Unsupported(format!("volume {}: stopping ublk device {} ({}): {e}", self.volume, self.dev_id, path.display())));
        let t = Instant::now();
        while !server.is_finished() && t.elapsed() < STOP_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        let joined = if server.is_finished() {
            let _ = server.join();
            Ok(())
        } else {
            Err(DeviceError::Unsupported(format!(
                "volume {}: the ublk queues of {} did not end within {STOP_TIMEOUT:?} after the stop",
                self.volume,
                path.display()
            )))
        };
        info!(volume = %self.volume, device = %path.display(), "ublk device stopped and deleted");
        flushed.and(stopped).and(joined)
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            warn!(volume = %self.volume, "ublk device teardown: {e}");
        }
    }
}

/// The server thread: creates the device, runs the queues until the device is
/// stopped, deletes it. Reports the device id (or why it failed) on `tx`.
fn serve(
    vol: String,
    backend: Arc<dyn BlockBackend>,
    nr_queues: u16,
    setups: Arc<Mutex<Vec<Option<QueueSetup>>>>,
    tx: mpsc::SyncSender<std::result::Result<u32, String>>,
) {
    let ctrl = match UblkCtrlBuilder::default()
        .name("longhorn")
        .id(-1)
        .nr_queues(nr_queues)
        .depth(DEPTH)
        .io_buf_bytes(IO_BUF_BYTES)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(format!("adding a device through {CONTROL} failed: {e}")));
            return;
        }
    };
    let dev_id = ctrl.dev_info().dev_id;
    info!(volume = %vol, dev_id, queues = nr_queues, depth = DEPTH, "ublk device added");
    let size = backend.size();
    let tgt_init = |dev: &mut UblkDev| {
        let lbs_shift: u8 = if size.is_multiple_of(BLOCK as u64) { 12 } else { 9 };
        dev.tgt.dev_size = size;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: lbs_shift,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: lbs_shift.max(12),
                max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: BLOCK,
                max_discard_sectors: MAX_RANGE >> 9,
                max_write_zeroes_sectors: MAX_RANGE >> 9,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };
    let qvol = vol.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        let setup = setups.lock().unwrap_or_else(|e| e.into_inner()).get_mut(qid as usize).and_then(Option::take);
        match setup {
            Some(s) => run_queue(&qvol, qid, dev, s),
            None => error!(volume = %qvol, queue = qid, "no engine session prepared for this ublk queue"),
        }
    };
    let started_tx = tx.clone();
    let svol = vol.clone();
    let dev_fn = move |c: &UblkCtrl| {
        let id = c.dev_info().dev_id;
        debug!(volume = %svol, dev_id = id, "ublk device started");
        let _ = started_tx.send(Ok(id));
    };
    match ctrl.run_target(tgt_init, q_fn, dev_fn) {
        Ok(_) => info!(volume = %vol, dev_id, "ublk queues ended"),
        Err(e) => {
            error!(volume = %vol, dev_id, "ublk device {dev_id}: {e}");
            let _ = tx.send(Err(format!("starting ublk device {dev_id}: {e}")));
        }
    }
    if let Err(e) = ctrl.del_dev() {
        // The device may already be gone (deleted from elsewhere).
        debug!(volume = %vol, dev_id, "deleting ublk device {dev_id}: {e}");
    }
}

/// Engine completions of one queue, waiting for the queue thread.
struct QueueDone {
    list: Mutex<Vec<(u64, IoResult)>>,
    dirty: AtomicBool,
    efd: OwnedFd,
}

impl QueueDone {
    fn new() -> std::io::Result<Arc<QueueDone>> {
        // SAFETY: eventfd(2) with flags; the fd is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Arc::new(QueueDone { list: Mutex::new(Vec::with_capacity(DEPTH as usize)), dirty: AtomicBool::new(false), efd }))
    }

    fn take(&self) -> Vec<(u64, IoResult)> {
        std::mem::take(&mut *self.list.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Resets the eventfd counter (before the list is drained, so no wakeup is lost).
    fn reset(&self) {
        let mut v = 0u64;
        // SAFETY: reading 8 bytes into a u64 from our non-blocking eventfd.
        unsafe { libc::read(self.efd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl Completer for QueueDone {
    fn complete(&self, tag: u64, result: IoResult) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push((tag, result));
        self.dirty.store(true, Ordering::SeqCst);
    }

    fn flush(&self) {
        if self.dirty.swap(false, Ordering::SeqCst) {
            let one = 1u64;
            // SAFETY: writing 8 bytes to our eventfd; EAGAIN (counter full) still
            // leaves it readable, which is all we need.
            unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

/// A request handed to the engine, until it completes.
#[derive(Clone, Copy)]
struct InFlight {
    op: u32,
    offset: u64,
    bytes: u32,
}

fn op_name(op: u32) -> &'static str {
    match op {
        sys::UBLK_IO_OP_READ => "READ",
        sys::UBLK_IO_OP_WRITE => "WRITE",
        sys::UBLK_IO_OP_FLUSH => "FLUSH",
        sys::UBLK_IO_OP_DISCARD => "DISCARD",
        sys::UBLK_IO_OP_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "other",
    }
}

fn arm_poll(q: &UblkQueue, efd: RawFd) -> std::result::Result<(), libublk::UblkError> {
    let sqe = io_uring::opcode::PollAdd::new(io_uring::types::Fd(efd), libc::POLLIN as u32)
        .build()
        .user_data(UblkIOCtx::build_user_data(EVENT_TAG, 0, 0, true));
    q.ublk_submit_sqe_sync(sqe)
}

/// One queue's thread: fetch requests, submit them to the engine, commit the results.
fn run_queue(vol: &str, qid: u16, dev: &UblkDev, setup: QueueSetup) {
    let dev_id = dev.dev_info.dev_id;
    let QueueSetup { session, done } = setup;
    let mut bufs: Vec<IoBuf<u8>> = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev).and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs)))) {
        Ok(q) => q,
        Err(e) => {
            error!(volume = %vol, dev_id, queue = qid, "setting up ublk queue {qid} of /dev/ublkb{dev_id}: {e}");
            return;
        }
    };
    let efd = done.efd.as_raw_fd();
    if let Err(e) = arm_poll(&queue, efd) {
        error!(volume = %vol, dev_id, queue = qid, "arming the completion eventfd of ublk queue {qid}: {e}");
        return;
    }
    debug!(volume = %vol, dev_id, queue = qid, "ublk queue serving");
    let mut inflight: Vec<Option<InFlight>> = vec![None; queue.get_depth() as usize];
    let mut to_push = false;

    let commit = |q: &UblkQueue, tag: u16, buf: &IoBuf<u8>, res: i32| {
        if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf.as_slice()), Ok(UblkIORes::Result(res))) {
            error!(volume = %vol, dev_id, queue = qid, tag, "committing a ublk request: {e}");
        }
    };

    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        if ctx.is_tgt_io() {
            if tag == EVENT_TAG {
                done.reset();
                for (etag, result) in done.take() {
                    let t = etag as usize;
                    let Some(f) = inflight.get_mut(t).and_then(Option::take) else {
                        warn!(volume = %vol, dev_id, queue = qid, tag = etag, "engine completed a ublk tag with nothing in flight");
                        continue;
                    };
                    let res = match result {
                        IoResult::Data(d) if f.op == sys::UBLK_IO_OP_READ && d.len() == f.bytes as usize => {
                            bufs[t].as_mut_slice()[..d.len()].copy_from_slice(&d);
                            f.bytes as i32
                        }
                        IoResult::Done if f.op == sys::UBLK_IO_OP_WRITE => f.bytes as i32,
                        IoResult::Done if f.op != sys::UBLK_IO_OP_READ => 0,
                        IoResult::Err(e) => {
                            warn!(volume = %vol, device = %format!("/dev/ublkb{dev_id}"), op = op_name(f.op), offset = f.offset, len = f.bytes, "I/O error: errno {e}");
                            -(if e > 0 { e } else { libc::EIO })
                        }
                        other => {
                            error!(volume = %vol, dev_id, op = op_name(f.op), len = f.bytes, "unexpected engine result {other:?}");
                            -libc::EIO
                        }
                    };
                    commit(q, etag as u16, &bufs[t], res);
                }
                if ctx.result() >= 0 || ctx.result() == -libc::EINTR || ctx.result() == -libc::EAGAIN {
                    if let Err(e) = arm_poll(q, efd) {
                        error!(volume = %vol, dev_id, queue = qid, "re-arming the completion eventfd: {e}");
                    }
                } else {
                    debug!(volume = %vol, dev_id, queue = qid, "completion poll ended: {}", ctx.result());
                }
            }
        } else {
            let t = tag as usize;
            let iod = q.get_iod(tag);
            let op = iod.op_flags & 0xff;
            let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
            let offset = iod.start_sector << 9;
            let bytes = iod.nr_sectors << 9;
            let io = match op {
                sys::UBLK_IO_OP_READ if bytes as usize <= bufs[t].len() => Some(IoOp::Read { offset, len: bytes }),
                // An empty write carries a preflush: it is a flush.
                sys::UBLK_IO_OP_WRITE if bytes == 0 => Some(IoOp::Flush),
                sys::UBLK_IO_OP_WRITE if bytes as usize <= bufs[t].len() => {
                    Some(IoOp::Write { offset, data: super::write_data(session.as_ref(), &bufs[t].as_slice()[..bytes as usize]), fua })
                }
                sys::UBLK_IO_OP_FLUSH => Some(IoOp::Flush),
                sys::UBLK_IO_OP_DISCARD => Some(IoOp::Trim { offset, len: bytes, fua }),
                sys::UBLK_IO_OP_WRITE_ZEROES => Some(IoOp::WriteZeroes { offset, len: bytes, fua }),
                _ => None,
            };
            match io {
                Some(io) => {
                    inflight[t] = Some(InFlight { op, offset, bytes });
                    session.submit(tag as u64, io);
                    to_push = true;
                }
                None => {
                    warn!(volume = %vol, dev_id, op, flags = iod.op_flags, offset, len = bytes, "ublk request not supported");
                    let e = if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) { libc::EINVAL } else { libc::EOPNOTSUPP };
                    commit(q, tag, &bufs[t], -e);
                }
            }
        }
        if to_push && ctx.is_last_cqe() {
            session.push();
            to_push = false;
        }
    });
    if to_push {
        session.push();
    }
    let left = inflight.iter().filter(|f| f.is_some()).count();
    if left > 0 {
        warn!(volume = %vol, dev_id, queue = qid, "ublk queue ended with {left} requests still in the engine");
    }
    debug!(volume = %vol, dev_id, queue = qid, "ublk queue ended");
}
