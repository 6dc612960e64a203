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
use std::time::SystemTime;

pub trait BackupTarget: Send + Sync {
    /// The target's URL, for messages.
    fn url(&self) -> &str;
    /// Writes an object whole; a reader sees the old object or the new one, never a part.
    fn put(&self, path: &str, data: &[u8]) -> Result<(), BackupError>;
    /// Reads an object; [`BackupError::NotFound`] when there is none.
    fn get(&self, path: &str) -> Result<Vec<u8>, BackupError>;
    fn exists(&self, path: &str) -> Result<bool, BackupError>;
    /// Names directly under the "directory" `dir` (objects and sub-directories, without
    /// the `dir/` prefix). A missing directory lists as empty.
    fn list(&self, dir: &str) -> Result<Vec<String>, BackupError>;
    /// Every object path under `dir`, recursively (full paths).
    fn list_all(&self, dir: &str) -> Result<Vec<String>, BackupError>;
    /// Removes an object; removing a missing one is not an error.
    fn delete(&self, path: &str) -> Result<(), BackupError>;
    /// When the object was last written, by the target's clock.
    fn mtime(&self, path: &str) -> Result<Option<SystemTime>, BackupError>;
    /// Whether the target can be reached and written (before a backup changes anything).
    fn check(&self) -> Result<(), BackupError>;
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
