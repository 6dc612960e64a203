//! `/dev/longhorn/<vol>`: a block node with the kernel device's major:minor, and the
//! mount check that guards a stop.

use super::{Ctx, DeviceError, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The device number of a block device node.
pub(crate) fn rdev_of(path: &Path) -> Result<libc::dev_t> {
    let m = std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?;
    if !m.file_type().is_block_device() {
        return Err(DeviceError::Unsupported(format!("{} is not a block device", path.display())));
    }
    Ok(m.rdev() as libc::dev_t)
}

/// A block device node we made; [`DevNode::remove`] (or drop) deletes it.
pub struct DevNode {
    path: Option<PathBuf>,
}

impl DevNode {
    /// Makes `DIR/NAME` a block node for `rdev`, replacing a stale node of a previous
    /// run (a node is only a name: replacing it touches no data).
    pub fn create(dir: &Path, name: &str, rdev: libc::dev_t, target: &Path) -> Result<DevNode> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(DeviceError::Unsupported(format!("volume name {name:?} cannot be a device node name")));
        }
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join(name);
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.file_type().is_block_device() || m.file_type().is_symlink() {
                tracing::warn!(node = %path.display(), "replacing a stale device node");
                std::fs::remove_file(&path).ctx(|| format!("removing stale {}", path.display()))?;
            } else {
                return Err(DeviceError::Unsupported(format!("{} exists and is not a device node", path.display())));
            }
        }
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| DeviceError::Unsupported(format!("{} has a NUL byte", path.display())))?;
        // SAFETY: a valid C string; mknod only creates a directory entry.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, rdev) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // Some sandboxes forbid mknod (no CAP_MKNOD / nodev /dev); a symlink works
            // for mkfs and mount all the same.
            tracing::info!(node = %path.display(), "mknod failed ({e}); making a symlink to {}", target.display());
            std::os::unix::fs::symlink(target, &path).ctx(|| format!("creating {} -> {}", path.display(), target.display()))?;
        }
        Ok(DevNode { path: Some(path) })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn remove(mut self) -> Result<()> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<()> {
        if let Some(p) = self.path.take() {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DeviceError::io(format!("removing {}", p.display()), e)),
            }
            // Leave /dev/longhorn itself when other volumes still have nodes in it.
            if let Some(d) = p.parent() {
                let _ = std::fs::remove_dir(d);
            }
        }
        Ok(())
    }
}

impl Drop for DevNode {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            tracing::error!("{e}");
        }
    }
}

/// The first mount point of device `rdev` in /proc/self/mountinfo, if any.
pub fn mounted_at(rdev: libc::dev_t) -> Option<String> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let want = format!("{maj}:{min}");
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint ...
    text.lines().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let mp = f.nth(1)?;
        (dev == want).then(|| mp.to_string())
    })
}
