//! The node plugin's filesystem work: what is mounted where (from
//! /proc/self/mountinfo), filesystem signatures (blkid), mkfs, mount and umount. It
//! runs util-linux's and e2fsprogs' programs, so what they refuse is refused with
//! their own words.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Mount {
    /// `major:minor` of the mounted device (a bind mount keeps its source's).
    pub dev: (u32, u32),
    pub root: String,
    pub point: String,
    pub options: String,
    pub fstype: String,
    pub source: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        let (left, right) = match line.split_once(" - ") {
            Some(p) => p,
            None => continue,
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        let dev = match l[2].split_once(':') {
            Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(0)),
            None => (0, 0),
        };
        out.push(Mount {
            dev,
            root: unescape(l[3]),
            point: unescape(l[4]),
            options: l[5].to_string(),
            fstype: r[0].to_string(),
            source: unescape(r[1]),
        });
    }
    Ok(out)
}

/// The mount at exactly `path` (the last one, which is what a lookup of the path sees).
pub fn mounted_at(path: &Path) -> Result<Option<Mount>> {
    // mountinfo has the resolved path: `a/../b` or a symlink in the request must match.
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let p = path.to_string_lossy();
    let p = p.trim_end_matches('/');
    Ok(mounts()?.into_iter().rev().find(|m| m.point == p))
}

/// `major:minor` of a block device file.
pub fn rdev(dev: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(dev).with_context(|| format!("{}", dev.display()))?;
    if !md.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    let r = md.rdev();
    Ok((libc::major(r), libc::minor(r)))
}

fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The filesystem (or other) signature on a device, None when blkid finds none. Probes
/// the device itself (`-p`), never blkid's cache.
pub fn signature(dev: &Path) -> Result<Option<String>> {
    let out = Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE"]).arg(dev).output().context("running blkid")?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // A signature without TYPE (a partition table) still means: do not format.
            Ok(Some(if t.is_empty() { "unknown".into() } else { t }))
        }
        Some(2) => Ok(None),
        _ => Err(anyhow!("blkid -p {} failed ({}): {}", dev.display(), out.status, String::from_utf8_lossy(&out.stderr).trim())),
    }
}

pub fn mkfs(dev: &Path, fs: &str) -> Result<()> {
    match fs {
        "ext4" => run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev))?,
        "xfs" => run(Command::new("mkfs.xfs").arg("-q").arg(dev))?,
        other => bail!("no mkfs for {other}"),
    };
    Ok(())
}

/// Grows a mounted filesystem to fill its (grown) device; both tools grow a mounted
/// filesystem online.
pub fn grow(dev: &Path, mounted_at: &Path, fstype: &str) -> Result<()> {
    match fstype {
        "ext4" => run(Command::new("resize2fs").arg(dev))?,
        "xfs" => run(Command::new("xfs_growfs").arg(mounted_at))?,
        other => bail!("cannot grow a {other} filesystem"),
    };
    Ok(())
}

/// Bytes of a block device.
fn device_bytes(dev: &Path) -> Result<u64> {
    let out = run(Command::new("blockdev").arg("--getsize64").arg(dev))?;
    out.trim().parse().with_context(|| format!("blockdev --getsize64 {}: {out:?}", dev.display()))
}

/// Grows an unmounted ext4 filesystem that is smaller than its device (the volume was
/// expanded while unpublished): checked first, as resize2fs asks of an offline grow.
/// Growing it offline needs no CAP_SYS_RESOURCE, which an online grow does.
pub fn grow_ext4_offline(dev: &Path) -> Result<bool> {
    let info = run(Command::new("dumpe2fs").arg("-h").arg(dev))?;
    let field = |name: &str| -> Option<u64> { info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()) };
    let (Some(blocks), Some(bsize)) = (field("Block count:"), field("Block size:")) else {
        bail!("dumpe2fs -h {}: no block count or size", dev.display());
    };
    if blocks * bsize + bsize > device_bytes(dev)? {
        return Ok(false);
    }
    // -p: repairs only what is safe without a person; anything else fails here and
    // the volume is not mounted.
    let out = Command::new("e2fsck").args(["-f", "-p"]).arg(dev).output().context("running e2fsck")?;
    if !matches!(out.status.code(), Some(0) | Some(1)) {
        bail!("e2fsck -f -p {} before growing it: {} {}", dev.display(), out.status, String::from_utf8_lossy(&out.stdout).trim());
    }
    run(Command::new("resize2fs").arg(dev))?;
    Ok(true)
}

pub fn mount(src: &Path, target: &Path, fstype: &str, options: &[String]) -> Result<()> {
    let mut c = Command::new("mount");
    c.args(["-t", fstype]);
    if !options.is_empty() {
        c.arg("-o").arg(options.join(","));
    }
    run(c.arg(src).arg(target))?;
    Ok(())
}

/// An NFSv4 mount of `ip:/export`: through mount.nfs, else (a host whose helper
/// cannot run) straight by the kernel, which then needs the server's address as an
/// option.
pub fn mount_nfs(ip: &str, export: &str, target: &Path, options: &[String]) -> Result<()> {
    let src = format!("{ip}:{export}");
    let helper = mount(Path::new(&src), target, "nfs4", options);
    let Err(e) = helper else { return Ok(()) };
    let mut opts = options.to_vec();
    opts.push(format!("addr={}", ip.trim_start_matches('[').trim_end_matches(']')));
    run(Command::new("mount").args(["-i", "-t", "nfs4", "-o", &opts.join(",")]).arg(&src).arg(target))
        .map(|_| ())
        .map_err(|e2| anyhow!("{e:#}; without the helper: {e2:#}"))
}

pub fn bind(src: &Path, target: &Path, readonly: bool) -> Result<()> {
    run(Command::new("mount").arg("--bind").arg(src).arg(target))?;
    if readonly {
        // A bind mount takes `ro` only on a remount of itself.
        if let Err(e) = run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(target)) {
            let _ = umount(target);
            return Err(e);
        }
    }
    Ok(())
}

pub fn umount(target: &Path) -> Result<()> {
    run(Command::new("umount").arg(target))?;
    Ok(())
}

pub struct Usage {
    pub total: u64,
    pub available: u64,
    pub used: u64,
    pub inodes: u64,
    pub inodes_free: u64,
}

pub fn statvfs(path: &Path) -> Result<Usage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).context("path holds a NUL")?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and s a statvfs the call fills in.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statvfs {}", path.display()));
    }
    let f = s.f_frsize as u64;
    Ok(Usage {
        total: s.f_blocks as u64 * f,
        available: s.f_bavail as u64 * f,
        used: (s.f_blocks as u64).saturating_sub(s.f_bfree as u64) * f,
        inodes: s.f_files as u64,
        inodes_free: s.f_ffree as u64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape(r"/mnt/a\040b\134c"), "/mnt/a b\\c");
        assert_eq!(super::unescape(r"/x\04"), r"/x\04");
    }
}
