//! `--frontend ublk`: not implemented in this build.
//!
//! The plan (see README "Frontends"): libublk 0.4 with one queue per CPU, depth >= 64,
//! each tag's task submitting to an engine `Session` and waiting on an eventfd read in
//! the queue's io_uring; volatile write cache + FUA declared, FLUSH (including empty
//! writes carrying a preflush), DISCARD and WRITE_ZEROES passed to the engine. Until
//! it lands, the probe says what the kernel has and that this build lacks the
//! frontend, so `auto` moves on to nbd or fuse and `--frontend ublk` fails clearly.

use super::{DeviceConfig, DeviceError, Result};
use std::path::{Path, PathBuf};

pub fn probe() -> std::result::Result<(), String> {
    if !Path::new("/dev/ublk-control").exists() {
        return Err("the kernel has no ublk driver (no /dev/ublk-control: needs Linux 6.0+ with ublk_drv loaded, `modprobe ublk_drv`)".into());
    }
    Err("the kernel has ublk (/dev/ublk-control), but this build has no ublk frontend yet; use --frontend nbd or fuse".into())
}

/// Never constructed: [`probe`] refuses first.
pub struct UblkDevice;

impl UblkDevice {
    pub fn attach(cfg: &DeviceConfig) -> Result<UblkDevice> {
        Err(DeviceError::Unsupported(format!("volume {}: {}", cfg.volume, probe().err().unwrap_or_default())))
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::new()
    }
    pub fn detach(self) -> Result<()> {
        Ok(())
    }
}
