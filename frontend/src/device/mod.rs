//! Block devices through the kernel: `/dev/longhorn/<vol>` for a volume.
//!
//! Three ways to get a kernel block device, tried in this order by `auto`:
//! - [`ublk`]: the ublk driver (`/dev/ublkbN`), one io_uring queue per CPU, requests
//!   go straight to an engine [`Session`](longhorn_engine::api::Session);
//! - [`kernel_nbd`]: the kernel NBD driver (`/dev/nbdN`) connected over generic
//!   netlink (ioctl as fallback) to sockets of the engine's own NBD export;
//! - [`fuse`]: the volume as one file in a FUSE mount, attached to a loop device
//!   (`/dev/loopN`) with direct I/O. Works on kernels with neither driver.
//!
//! Whatever the driver, `/dev/longhorn/<vol>` is a block node with the device's
//! major:minor (as Longhorn makes it), removed when the device is detached.

pub mod fuse;
pub mod kernel_nbd;
mod loopdev;
mod node;
pub mod ublk;

use longhorn_engine::api::BlockBackend;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::info;

pub use node::{mounted_at, DevNode};

/// Where device nodes go. `LONGHORN_DEV_DIR` moves it (tests that must not clash
/// with a real volume's node).
pub fn dev_dir() -> PathBuf {
    std::env::var_os("LONGHORN_DEV_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/dev/longhorn"))
}

/// An error of the device layer; the message names the volume and device at fault.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel (or this build) lacks what the frontend needs; says what is missing.
    #[error("{0}")]
    Unsupported(String),
    /// The device is in use (mounted) and the stop was not forced.
    #[error("{0}")]
    Busy(String),
}

impl DeviceError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> DeviceError {
        DeviceError::Io { what: what.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, DeviceError>;

/// Adds context to an `io::Result`.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| DeviceError::io(what(), e))
    }
}

/// Which kernel block device frontend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendKind {
    /// ublk, else nbd, else fuse.
    Auto,
    Ublk,
    Nbd,
    Fuse,
    /// No block device: the NBD export only.
    None,
}

impl std::str::FromStr for FrontendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => FrontendKind::Auto,
            "ublk" => FrontendKind::Ublk,
            "nbd" => FrontendKind::Nbd,
            "fuse" => FrontendKind::Fuse,
            "none" => FrontendKind::None,
            _ => return Err(format!("unknown frontend {s:?}: use auto, ublk, nbd, fuse or none")),
        })
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::Auto => "auto",
            FrontendKind::Ublk => "ublk",
            FrontendKind::Nbd => "nbd",
            FrontendKind::Fuse => "fuse",
            FrontendKind::None => "none",
        })
    }
}

/// What a device frontend needs to know about the volume it serves.
#[derive(Clone)]
pub struct DeviceConfig {
    pub volume: String,
    pub backend: Arc<dyn BlockBackend>,
    /// The engine's NBD export as it was bound (`unix:PATH` or `tcp:HOST:PORT`); the
    /// kernel NBD frontend connects its sockets there.
    pub nbd_listen: String,
    /// The engine's runtime directory (FUSE mount points go below it).
    pub run_dir: PathBuf,
}

enum Inner {
    Fuse(fuse::FuseDevice),
    Nbd(kernel_nbd::NbdDevice),
    Ublk(ublk::UblkDevice),
}

/// A volume attached as a kernel block device, with its `/dev/longhorn/<vol>` node.
pub struct Device {
    kind: FrontendKind,
    volume: String,
    inner: Option<Inner>,
    node: Option<DevNode>,
    /// The kernel device (`/dev/loop3`, `/dev/nbd0`, `/dev/ublkb0`).
    kernel_path: PathBuf,
    rdev: libc::dev_t,
}

impl Device {
    /// Attaches the volume with `kind`; `Auto` tries ublk, nbd, fuse in that order and
    /// logs why each one it passes over is not usable.
    pub fn attach(kind: FrontendKind, cfg: &DeviceConfig) -> Result<Device> {
        match kind {
            FrontendKind::None => Err(DeviceError::Unsupported("frontend `none` has no block device".into())),
            FrontendKind::Auto => {
                let mut why = Vec::new();
                for k in [FrontendKind::Ublk, FrontendKind::Nbd, FrontendKind::Fuse] {
                    if let Err(e) = probe(k) {
                        info!(volume = %cfg.volume, frontend = %k, "not available: {e}");
                        why.push(format!("{k}: {e}"));
                        continue;
                    }
                    match Device::attach(k, cfg) {
                        Ok(d) => {
                            info!(volume = %cfg.volume, frontend = %k, "auto chose {k}");
                            return Ok(d);
                        }
                        Err(e) => {
                            info!(volume = %cfg.volume, frontend = %k, "attaching failed: {e}");
                            why.push(format!("{k}: {e}"));
                        }
                    }
                }
                Err(DeviceError::Unsupported(format!(
                    "volume {}: no block device frontend works here ({})",
                    cfg.volume,
                    why.join("; ")
                )))
            }
            k => {
                probe(k).map_err(|e| DeviceError::Unsupported(format!("volume {}: {e}", cfg.volume)))?;
                let (inner, kernel_path) = match k {
                    FrontendKind::Fuse => {
                        let d = fuse::FuseDevice::attach(cfg)?;
                        let p = d.loop_path();
                        (Inner::Fuse(d), p)
                    }
                    FrontendKind::Nbd => {
                        let d = kernel_nbd::NbdDevice::attach(cfg)?;
                        let p = d.path();
                        (Inner::Nbd(d), p)
                    }
                    FrontendKind::Ublk => {
                        let d = ublk::UblkDevice::attach(cfg)?;
                        let p = d.path();
                        (Inner::Ublk(d), p)
                    }
                    _ => unreachable!("handled above"),
                };
                let mut dev = Device { kind: k, volume: cfg.volume.clone(), inner: Some(inner), node: None, kernel_path, rdev: 0 };
                // From here on, a failure detaches what was attached (Drop).
                dev.rdev = node::rdev_of(&dev.kernel_path)?;
                dev.node = Some(DevNode::create(&dev_dir(), &cfg.volume, dev.rdev, &dev.kernel_path)?);
                info!(volume = %cfg.volume, frontend = %k, device = %dev.kernel_path.display(), node = %dev.path().display(), "block device attached");
                Ok(dev)
            }
        }
    }

    pub fn kind(&self) -> FrontendKind {
        self.kind
    }

    /// `/dev/longhorn/<vol>`.
    pub fn path(&self) -> PathBuf {
        dev_dir().join(&self.volume)
    }

    /// The kernel's own device (`/dev/loopN`, `/dev/nbdN`, `/dev/ublkbN`).
    pub fn kernel_path(&self) -> &Path {
        &self.kernel_path
    }

    /// Where the device is mounted, if it is (from /proc/self/mountinfo).
    pub fn mounted_at(&self) -> Option<String> {
        mounted_at(self.rdev)
    }

    /// Flushes the device, detaches it and removes `/dev/longhorn/<vol>`. Refused while
    /// the device is mounted unless `force` (then I/O of the mount fails from now on).
    pub fn detach(mut self, force: bool) -> Result<()> {
        if let Some(mp) = self.mounted_at() {
            if !force {
                return Err(DeviceError::Busy(format!(
                    "volume {}: {} ({}) is mounted on {mp}; unmount it first, or force the stop",
                    self.volume,
                    self.path().display(),
                    self.kernel_path.display()
                )));
            }
            tracing::warn!(volume = %self.volume, mount = %mp, "forced stop: detaching a mounted device; its filesystem will see I/O errors");
        }
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        // The node goes first so nobody opens a device that is going away.
        let node_res = match self.node.take() {
            Some(n) => n.remove(),
            None => Ok(()),
        };
        let res = match self.inner.take() {
            Some(Inner::Fuse(d)) => d.detach(),
            Some(Inner::Nbd(d)) => d.detach(),
            Some(Inner::Ublk(d)) => d.detach(),
            None => Ok(()),
        };
        res.and(node_res)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.inner.is_some() {
            if let Err(e) = self.teardown() {
                tracing::error!(volume = %self.volume, "detaching the block device: {e}");
            }
        }
    }
}

/// Whether the kernel has what frontend `kind` needs; the error says what is missing.
pub fn probe(kind: FrontendKind) -> std::result::Result<(), String> {
    match kind {
        FrontendKind::Ublk => ublk::probe(),
        FrontendKind::Nbd => kernel_nbd::probe(),
        FrontendKind::Fuse => fuse::probe(),
        FrontendKind::Auto | FrontendKind::None => Ok(()),
    }
}

/// Opens `path` read-write and asks the kernel to write the device's dirty pages and
/// flush its cache (a block device's fsync sends a FLUSH through the driver).
pub(crate) fn flush_blockdev(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).ctx(|| format!("opening {} to flush it", path.display()))?;
    f.sync_all().ctx(|| format!("flushing {}", path.display()))
}

/// A write's data copied out of a kernel buffer: into memory the replicas on this host
/// read from, when the engine offers it (one copy instead of two).
pub(crate) fn write_data(session: &dyn longhorn_engine::api::Session, src: &[u8]) -> bytes::Bytes {
    match session.write_buffer(src.len()) {
        Some(mut buf) => {
            buf.as_mut_slice().copy_from_slice(src);
            buf.freeze()
        }
        None => bytes::Bytes::copy_from_slice(src),
    }
}
