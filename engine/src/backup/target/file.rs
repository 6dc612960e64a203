//! `file:///path` (and Longhorn's `vfs:///path`): the backupstore in a local directory,
//! or in any filesystem mounted there (an NFS share mounted by the kernel, for one).

use super::BackupTarget;
use crate::backup::BackupError;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub struct FileTarget {
    url: String,
    root: PathBuf,
}

impl FileTarget {
    pub fn new(url: &str, root: &str) -> FileTarget {
        FileTarget { url: url.to_string(), root: PathBuf::from(root) }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn err(&self, object: &str, e: std::io::Error) -> BackupError {
        if e.kind() == ErrorKind::NotFound {
            BackupError::NotFound { target: self.url.clone(), object: object.to_string() }
        } else {
            BackupError::Target { target: self.url.clone(), object: object.to_string(), what: e.to_string() }
        }
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let r = format!("{rel}/{name}");
        if e.file_type()?.is_dir() {
            walk(&e.path(), &r, out)?;
        } else if !name.ends_with(".tmp") {
            out.push(r);
        }
    }
    Ok(())
}

impl BackupTarget for FileTarget {
    fn url(&self) -> &str {
        &self.url
    }

    fn put(&self, p: &str, data: &[u8]) -> Result<(), BackupError> {
        let path = self.path(p);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| self.err(p, e))?;
        }
        // Written beside, then renamed: a reader never sees half an object.
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let r = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(|e| self.err(p, e))
    }

    fn get(&self, p: &str) -> Result<Vec<u8>, BackupError> {
        std::fs::read(self.path(p)).map_err(|e| self.err(p, e))
    }

    fn exists(&self, p: &str) -> Result<bool, BackupError> {
        match std::fs::metadata(self.path(p)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(p, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        let rd = match std::fs::read_dir(self.path(dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(dir, e)),
        };
        let mut v = Vec::new();
        for e in rd {
            let e = e.map_err(|e| self.err(dir, e))?;
            let n = e.file_name().to_string_lossy().to_string();
            if !n.ends_with(".tmp") {
                v.push(n);
            }
        }
        v.sort();
        Ok(v)
    }

    fn list_all(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        let mut v = Vec::new();
        walk(&self.path(dir), dir.trim_end_matches('/'), &mut v).map_err(|e| self.err(dir, e))?;
        v.sort();
        Ok(v)
    }

    fn delete(&self, p: &str) -> Result<(), BackupError> {
        let path = self.path(p);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err(p, e)),
        }
        // Empty block directories go too (Longhorn leaves them; either reads the store).
        let mut d = path.parent();
        for _ in 0..2 {
            match d {
                Some(x) if x.starts_with(&self.root) && std::fs::remove_dir(x).is_ok() => d = x.parent(),
                _ => break,
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), BackupError> {
        let d = self.path(crate::backup::store::BASE);
        std::fs::create_dir_all(&d).map_err(|e| self.err(crate::backup::store::BASE, e))?;
        let probe = d.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| self.err(crate::backup::store::BASE, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    fn mtime(&self, p: &str) -> Result<Option<SystemTime>, BackupError> {
        match std::fs::metadata(self.path(p)) {
            Ok(m) => Ok(m.modified().ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(p, e)),
        }
    }
}
