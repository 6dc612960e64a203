//! Loop devices from Rust: `losetup --direct-io=on` through the LOOP_CONFIGURE ioctl
//! (one atomic call, Linux 5.8+), with LOOP_SET_FD + LOOP_SET_DIRECT_IO as fallback.
//! Layouts from include/uapi/linux/loop.h.

use super::{Ctx, DeviceError, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_DIRECT_IO: u32 = 16;

#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn info(name: &str, flags: u32) -> LoopInfo64 {
    let mut i = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    let b = name.as_bytes();
    let n = b.len().min(63);
    i.lo_file_name[..n].copy_from_slice(&b[..n]);
    i
}

/// An attached loop device. Detach with [`LoopDevice::detach`].
pub(crate) struct LoopDevice {
    dev: Option<File>,
    path: PathBuf,
    number: u32,
}

impl LoopDevice {
    /// Attaches `backing` (opened here with O_DIRECT) to a free loop device with direct
    /// I/O, logical block size `block_size`; `label` shows in `losetup -l`.
    pub fn attach(backing: &Path, block_size: u32, label: &str) -> Result<LoopDevice> {
        let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control").ctx(|| "opening /dev/loop-control".into())?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(backing)
            .ctx(|| format!("opening {} with O_DIRECT", backing.display()))?;
        // GET_FREE and CONFIGURE are two steps: another process may take the same
        // device in between (EBUSY); then ask again.
        let mut last = None;
        for _ in 0..8 {
            // SAFETY: ioctl without an argument on the loop control device.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(DeviceError::io("LOOP_CTL_GET_FREE", std::io::Error::last_os_error()));
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(d) => d,
                Err(e) => {
                    last = Some(DeviceError::io(format!("opening {}", path.display()), e));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            match configure(&dev, &file, block_size, label) {
                Ok(()) => return Ok(LoopDevice { dev: Some(dev), path, number: n as u32 }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = Some(DeviceError::io(format!("{} was taken meanwhile", path.display()), e));
                }
                Err(e) => return Err(DeviceError::io(format!("attaching {} to {}", backing.display(), path.display()), e)),
            }
        }
        Err(last.unwrap_or_else(|| DeviceError::Unsupported("no free loop device".into())))
    }

    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Detaches and waits (up to 10 s) until the kernel has let go of the backing file,
    /// so the FUSE mount behind it can be unmounted.
    pub fn detach(mut self) -> Result<()> {
        let Some(dev) = self.dev.take() else { return Ok(()) };
        // SAFETY: ioctl without an argument on our own open loop device. While someone
        // else still has the device open the kernel defers the detach to the last close.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENXIO) {
                return Err(DeviceError::io(format!("detaching {}", self.path.display()), e));
            }
        }
        drop(dev);
        let bf = PathBuf::from(format!("/sys/block/loop{}/loop/backing_file", self.number));
        let t = Instant::now();
        while bf.exists() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(DeviceError::Busy(format!("{} is still open by another process; its detach is deferred to the last close", self.path.display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            // SAFETY: as in detach.
            unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) };
        }
    }
}

fn configure(dev: &File, file: &File, block_size: u32, label: &str) -> std::io::Result<()> {
    let cfg = LoopConfig { fd: file.as_raw_fd() as u32, block_size, info: info(label, LO_FLAGS_DIRECT_IO), reserved: [0; 8] };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` that lives across the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(e);
    }
    // Older kernels: the same in three steps.
    // SAFETY: LOOP_SET_FD takes the backing fd by value.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, file.as_raw_fd() as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let li = info(label, 0);
    // SAFETY: reads a loop_info64 that lives across the call; the others take values.
    unsafe {
        libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64, &li as *const LoopInfo64);
        libc::ioctl(dev.as_raw_fd(), LOOP_SET_BLOCK_SIZE, block_size as libc::c_ulong);
        if libc::ioctl(dev.as_raw_fd(), LOOP_SET_DIRECT_IO, 1 as libc::c_ulong) != 0 {
            let e = std::io::Error::last_os_error();
            libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD);
            return Err(e);
        }
    }
    Ok(())
}
