//! `file:///path` (and Longhorn's `vfs:///path`): the backupstore in a local directory,
//! or in any filesystem mounted there (an NFS share mounted by the kernel, for one).
//!
//! Durability: a change this target reports done survives a crash. An object is
//! written to a temporary of its own (see [`TempNames`]), synced, renamed over its
//! name, and the directory is synced; a directory it makes is synced in its parent; a
//! removal is synced in its directory (so a removed backup cfg cannot come back after
//! its blocks were collected). A directory another writer is making at the same time
//! is durable once that writer's put returns.

use super::{too_deep, too_large, BackupTarget, TempNames};
use crate::backup::BackupError;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub struct FileTarget {
    url: String,
    root: PathBuf,
    tmp: TempNames,
}

/// Syncs directory `dir`: what was made, renamed or removed in it is then durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes `dir` and its missing parents, syncing the parent of each one made.
pub(crate) fn create_dirs_synced(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    create_dirs_synced(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        // Made by another writer meanwhile; its entry may not be synced yet.
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => sync_dir(parent),
        Err(e) => Err(e),
    }
}

impl FileTarget {
    pub fn new(url: &str, root: &str) -> FileTarget {
        FileTarget { url: url.to_string(), root: PathBuf::from(root), tmp: TempNames::new() }
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

/// Objects under `dir` (named `rel` in messages and results), `depth` levels down at
/// most. Directories are told by the entry's own type, never by following a symlink.
fn walk(url: &str, dir: &Path, rel: &str, depth: usize, out: &mut Vec<String>) -> std::io::Result<()> {
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
            if depth > 1 {
                walk(url, &e.path(), &r, depth - 1, out)?;
            } else {
                too_deep(url, &r, depth);
            }
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
        let dir = path.parent().unwrap_or(&self.root);
        create_dirs_synced(dir).map_err(|e| self.err(p, e))?;
        // Written beside, then renamed: a reader never sees half an object.
        let mut tmp = path.clone().into_os_string();
        tmp.push(self.tmp.suffix());
        let tmp = PathBuf::from(tmp);
        let r = (|| {
            let mut f = std::fs::File::create_new(&tmp)?;
            f.write_all(data)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(dir)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.map_err(|e| self.err(p, e))
    }

    fn get(&self, p: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        let path = self.path(p);
        // A FIFO or a device would block or never end: only a regular file is an object.
        let m = std::fs::metadata(&path).map_err(|e| self.err(p, e))?;
        if !m.is_file() {
            return Err(BackupError::Corrupt { target: self.url.clone(), object: p.to_string(), what: "not a regular file".into() });
        }
        let f = std::fs::File::open(&path).map_err(|e| self.err(p, e))?;
        let len = f.metadata().map_err(|e| self.err(p, e))?.len();
        if len > max {
            return Err(too_large(&self.url, p, max, Some(len)));
        }
        // The length is a hint: the file may grow, or be a device that has none.
        let mut out = Vec::with_capacity(len as usize);
        f.take(max + 1).read_to_end(&mut out).map_err(|e| self.err(p, e))?;
        if out.len() as u64 > max {
            return Err(too_large(&self.url, p, max, None));
        }
        Ok(out)
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

    fn list_all(&self, dir: &str, max_depth: usize) -> Result<Vec<String>, BackupError> {
        let mut v = Vec::new();
        walk(&self.url, &self.path(dir), dir.trim_end_matches('/'), max_depth, &mut v).map_err(|e| self.err(dir, e))?;
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
        if let Some(d) = path.parent() {
            sync_dir(d).map_err(|e| self.err(p, e))?;
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
        create_dirs_synced(&d).map_err(|e| self.err(crate::backup::store::BASE, e))?;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system's temporary directory, removed on drop.
    pub(crate) struct Scratch(pub PathBuf);

    impl Scratch {
        pub(crate) fn new(tag: &str) -> Scratch {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let d = std::env::temp_dir().join(format!("lh-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("scratch dir");
            Scratch(d)
        }

        pub(crate) fn target(&self) -> FileTarget {
            FileTarget::new(&format!("file://{}", self.0.display()), &self.0.display().to_string())
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn get_refuses_objects_over_the_bound() {
        let s = Scratch::new("get-bound");
        let t = s.target();
        t.put("a/b", &[7u8; 100]).expect("put");
        assert_eq!(t.get("a/b", 100).expect("at the bound").len(), 100);
        let e = t.get("a/b", 99).expect_err("over the bound");
        assert!(matches!(e, BackupError::Corrupt { .. }) && e.to_string().contains("larger than"), "{e}");
        assert!(matches!(t.get("a/none", 10), Err(BackupError::NotFound { .. })));
        // Not a regular file: refused, never read.
        std::os::unix::fs::symlink("/dev/zero", s.0.join("a/zero")).expect("symlink");
        assert!(matches!(t.get("a/zero", 10), Err(BackupError::Corrupt { .. })));
    }

    #[test]
    fn concurrent_puts_of_one_path_both_land_whole() {
        let s = Scratch::new("put-race");
        let t = std::sync::Arc::new(s.target());
        let data: Vec<Vec<u8>> = (0..2u8).map(|i| vec![i + 1; 256 << 10]).collect();
        for round in 0..200 {
            let path = format!("v/{round}.cfg");
            let r: Vec<Result<(), BackupError>> = std::thread::scope(|sc| {
                let h: Vec<_> = data.iter().map(|d| sc.spawn(|| t.put(&path, d))).collect();
                h.into_iter().map(|h| h.join().expect("thread")).collect()
            });
            for x in &r {
                assert!(x.is_ok(), "round {round}: a put failed: {x:?}");
            }
            let got = t.get(&path, 1 << 20).expect("get");
            assert!(data.contains(&got), "round {round}: the object is neither put whole ({} bytes)", got.len());
        }
        assert_eq!(std::fs::read_dir(s.0.join("v")).expect("read_dir").count(), 200, "no temporary left behind");
    }

    #[test]
    fn list_all_stops_at_its_depth() {
        let s = Scratch::new("walk-depth");
        let t = s.target();
        t.put("d/1/2/x", b"x").expect("put");
        t.put("d/1/2/3/y", b"y").expect("put");
        t.put("d/z", b"z").expect("put");
        assert_eq!(t.list_all("d", 3).expect("walk"), vec!["d/1/2/x".to_string(), "d/z".to_string()]);
        assert_eq!(t.list_all("d", 4).expect("walk").len(), 3);
    }
}
