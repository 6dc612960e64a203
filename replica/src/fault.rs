//! Fault points for tests, read from the environment of the replica process. None of
//! them does anything unless its variable is set.
//!
//! - `LONGHORN_CRASH_AT=<step>`: abort the process right after `<step>` (crash-safety
//!   tests of chain changes).
//! - `LONGHORN_STALL_AT=<step>`: stop at `<step>` for an hour, as a replica whose disk or
//!   process hangs (tests that the engine bounds its waits).
//! - `LONGHORN_SLOW_WRITE=<offset>:<ms>`: a write into the head at byte `offset` pauses
//!   `ms` milliseconds between being accepted and its pwrite (durability race tests).
//! - `LONGHORN_SLOW_ZERO=<ms>`: zeroing or trimming takes `ms` milliseconds per MiB more,
//!   as on a slow disk (tests that long zeroings do not exceed the I/O timeout).
//! - `LONGHORN_FAIL_SYNC=<n>`: the `n`-th sync of the head (1 = the first) fails with
//!   EIO, as a disk's writeback error would (tests that a failed sync sticks).

use std::sync::OnceLock;
use std::time::Duration;

/// A named step of a chain change or rebuild.
pub fn point(step: &str) {
    if let Ok(v) = std::env::var("LONGHORN_CRASH_AT") {
        if v == step {
            eprintln!("LONGHORN_CRASH_AT={step}: aborting");
            std::process::abort();
        }
    }
    if let Ok(v) = std::env::var("LONGHORN_STALL_AT") {
        if v == step {
            eprintln!("LONGHORN_STALL_AT={step}: stalling");
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// The write path's fault point (parsed once: it is on the hot path).
pub fn slow_write(offset: u64) {
    static SLOW: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    let slow = SLOW.get_or_init(|| {
        let v = std::env::var("LONGHORN_SLOW_WRITE").ok()?;
        let (o, ms) = v.split_once(':')?;
        Some((o.parse().ok()?, ms.parse().ok()?))
    });
    if let Some((o, ms)) = *slow {
        if o == offset {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

/// The zeroing path's fault point: `len` bytes are about to be zeroed or trimmed.
pub fn slow_zero(len: u64) {
    static SLOW: OnceLock<Option<u64>> = OnceLock::new();
    let ms = SLOW.get_or_init(|| std::env::var("LONGHORN_SLOW_ZERO").ok()?.parse().ok());
    if let Some(ms) = *ms {
        std::thread::sleep(Duration::from_millis(ms * len.div_ceil(1 << 20)));
    }
}

/// The head sync's fault point: `Err(EIO)` at the sync `LONGHORN_FAIL_SYNC` names.
pub fn sync_fails() -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let Some(at) = *AT.get_or_init(|| std::env::var("LONGHORN_FAIL_SYNC").ok()?.parse().ok()) else { return Ok(()) };
    if COUNT.fetch_add(1, Ordering::AcqRel) + 1 == at {
        eprintln!("LONGHORN_FAIL_SYNC={at}: this sync fails with EIO");
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}
