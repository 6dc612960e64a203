//! `nfs://host:/export/path`: not implemented yet (see the README's Backups section).

use super::BackupTarget;
use crate::backup::BackupError;

pub struct NfsTarget;

impl NfsTarget {
    pub fn new(url: &str) -> Result<NfsTarget, BackupError> {
        Err(BackupError::Invalid(format!(
            "backup target {url:?}: nfs:// is not supported by this build yet; mount the share and use file:///MOUNTPOINT"
        )))
    }
}

impl BackupTarget for NfsTarget {
    fn url(&self) -> &str { "" }
    fn put(&self, _: &str, _: &[u8]) -> Result<(), BackupError> { unreachable_target() }
    fn get(&self, _: &str) -> Result<Vec<u8>, BackupError> { unreachable_target() }
    fn exists(&self, _: &str) -> Result<bool, BackupError> { unreachable_target() }
    fn list(&self, _: &str) -> Result<Vec<String>, BackupError> { unreachable_target() }
    fn list_all(&self, _: &str) -> Result<Vec<String>, BackupError> { unreachable_target() }
    fn delete(&self, _: &str) -> Result<(), BackupError> { unreachable_target() }
    fn check(&self) -> Result<(), BackupError> { unreachable_target() }
    fn mtime(&self, _: &str) -> Result<Option<std::time::SystemTime>, BackupError> { unreachable_target() }
}

fn unreachable_target<T>() -> Result<T, BackupError> {
    Err(BackupError::Invalid("nfs:// is not supported by this build".into()))
}
