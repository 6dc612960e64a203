//! Backup targets: where the backupstore's objects live. The format code (`store`)
//! only talks to [`BackupTarget`]; each kind of target is one module.
//!
//! Object paths are relative to the target's root and use `/`
//! (`backupstore/volumes/01/9c/vol1/volume.cfg`). A target URL names the root:
//! `file:///path` (Longhorn's `vfs:///path` too), `s3://bucket@region/prefix`,
//! `nfs://host:/export/path`.

pub mod file;
pub mod nfs;
pub mod s3;

use super::BackupError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub trait BackupTarget: Send + Sync {
    /// The target's URL, for messages.
    fn url(&self) -> &str;
    /// Writes an object whole; a reader sees the old object or the new one, never a part.
    fn put(&self, path: &str, data: &[u8]) -> Result<(), BackupError>;
    /// Reads an object; [`BackupError::NotFound`] when there is none, and
    /// [`BackupError::Corrupt`] (see [`too_large`]) when it holds more than `max` bytes:
    /// what the store holds is not trusted, and no object may make a reader hold more
    /// than the format allows it.
    fn get(&self, path: &str, max: u64) -> Result<Vec<u8>, BackupError>;
    fn exists(&self, path: &str) -> Result<bool, BackupError>;
    /// Names directly under the "directory" `dir` (objects and sub-directories, without
    /// the `dir/` prefix). A missing directory lists as empty.
    fn list(&self, dir: &str) -> Result<Vec<String>, BackupError>;
    /// Every object path under `dir` at most `max_depth` levels down (1: directly in
    /// `dir`), as full paths. Deeper directories are not entered, with a warning, so a
    /// tree that is too deep (or loops) cannot make a walk go on forever.
    fn list_all(&self, dir: &str, max_depth: usize) -> Result<Vec<String>, BackupError>;
    /// Removes an object; removing a missing one is not an error.
    fn delete(&self, path: &str) -> Result<(), BackupError>;
    /// When the object was last written, by the target's clock.
    fn mtime(&self, path: &str) -> Result<Option<SystemTime>, BackupError>;
    /// Whether the target can be reached and written (before a backup changes anything).
    fn check(&self) -> Result<(), BackupError>;
}

/// Names for the temporary an object is written to before it is renamed into place.
/// Two writers must never share one (one would rename or truncate the other's), not
/// two threads of a process nor two hosts on one share: a name holds the pid, a
/// counter and a random number drawn per target.
pub(crate) struct TempNames {
    seq: AtomicU64,
    nonce: u64,
}

/// A random number, different at each call (std's randomly keyed hasher, fed the time).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

impl TempNames {
    pub(crate) fn new() -> TempNames {
        TempNames { seq: AtomicU64::new(0), nonce: random_u64() }
    }

    /// What to append to an object's name for its next temporary (listings skip `*.tmp`).
    pub(crate) fn suffix(&self) -> String {
        format!(".{}-{}-{:016x}.tmp", std::process::id(), self.seq.fetch_add(1, Ordering::Relaxed), self.nonce)
    }
}

/// The error for an object bigger than a reader accepts.
pub(crate) fn too_large(target: &str, object: &str, max: u64, size: Option<u64>) -> BackupError {
    let what = match size {
        Some(s) => format!("it is {s} bytes, larger than the {max} such an object can be"),
        None => format!("it is larger than the {max} bytes such an object can be"),
    };
    BackupError::Corrupt { target: target.to_string(), object: object.to_string(), what }
}

/// The warning for a directory a walk does not enter.
pub(crate) fn too_deep(target: &str, dir: &str, max_depth: usize) {
    tracing::warn!(target, "not walking {dir}: deeper than {max_depth} levels, where no object of the store lives");
}

/// Opens the target `url`. `env` holds Longhorn's credential variables
/// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINTS, VIRTUAL_HOSTED_STYLE, ...);
/// the process environment fills in what it lacks.
pub fn open(url: &str, env: &HashMap<String, String>) -> Result<Box<dyn BackupTarget>, BackupError> {
    let invalid = |what: &str| BackupError::Invalid(format!("backup target {url:?}: {what}"));
    if let Some(p) = url.strip_prefix("file://").or_else(|| url.strip_prefix("vfs://")) {
        if !p.starts_with('/') {
            return Err(invalid("the path must be absolute (file:///path)"));
        }
        return Ok(Box::new(file::FileTarget::new(url, p)));
    }
    if url.starts_with("s3://") {
        return Ok(Box::new(s3::S3Target::new(url, env)?));
    }
    if url.starts_with("nfs://") {
        return Ok(Box::new(nfs::NfsTarget::new(url)?));
    }
    Err(invalid("unsupported scheme; use file:///path, nfs://host:/export/path or s3://bucket@region/prefix"))
}

/// The credential variables a backup target reads, taken from this process's environment.
pub const ENV_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINTS",
    "VIRTUAL_HOSTED_STYLE",
];

pub fn env_from_process() -> HashMap<String, String> {
    ENV_VARS.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect()
}

pub(crate) fn env_get(env: &HashMap<String, String>, k: &str) -> Option<String> {
    env.get(k).cloned().or_else(|| std::env::var(k).ok()).filter(|v| !v.is_empty())
}
