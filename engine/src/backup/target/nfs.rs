//! `nfs://host:/export/path`: the backupstore on an NFSv4 share, spoken from userspace
//! with the `nfs-rs` client (NFSv4.1, falling back to 4.0). Nothing is mounted in the
//! kernel, so an engine needs no NFS client module, no mount privileges and no
//! mount point that could outlive it.
//!
//! URL, as Longhorn writes it: `nfs://HOST:/EXPORT/PATH[?nfsOptions=OPT,OPT...]`.
//! `HOST:/PATH` and `HOST/PATH` both name the NFSv4 path PATH on HOST. Of the mount
//! options, `port=N` (default 2049) and `vers=4.0|4.1|4.2` are honoured; the others
//! Longhorn users write (`soft`, `timeo=`, `retrans=`, `actimeo=`, ...) tune a kernel
//! mount and mean nothing here, so they are accepted and ignored.
//!
//! Invariants:
//! - An object is written as `NAME.<pid>-<n>-<random>.tmp` beside its final name,
//!   committed to stable storage (WRITE UNSTABLE + COMMIT, verifier checked by nfs-rs)
//!   and then renamed over NAME, so a reader sees the old object or the new one, never
//!   a part.
//!   Listings skip `*.tmp`, as the file target's do.
//! - A lost connection (server restarted, TCP reset) drops the mount; new mounts are
//!   tried for about [`RECONNECT_WINDOW`] and the operation is retried once on the new
//!   one. Every operation here is idempotent, a put included (a put cut short may leave
//!   its `.tmp` behind).

use super::{too_deep, too_large, BackupTarget, TempNames};
use crate::backup::BackupError;
use nfs_rs::Mount;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, warn};

/// NFSv4 file type of a directory (RFC 7530 `NF4DIR`; NFSv3's `NF3DIR` has the same value).
const NF4DIR: u32 = 2;
/// Bounds every operation: an unreachable or hung server fails the backup, it never hangs it.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a lost server is waited for before the operation fails (a kernel mount
/// with Longhorn's default `soft,timeo=300,retry=2` waits about as long).
const RECONNECT_WINDOW: Duration = Duration::from_secs(30);
/// Bounds one try to mount.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);
/// A failed mount is not tried again for this long; callers get its error at once.
const MOUNT_RETRY: Duration = Duration::from_millis(500);

/// The current mount, or when and why the last try to make one failed.
#[derive(Default)]
struct Mounted {
    mount: Option<Arc<dyn Mount>>,
    failed: Option<(Instant, String)>,
}

pub struct NfsTarget {
    url: String,
    /// The URL handed to nfs-rs: `nfs://HOST/PATH?version=..&nfsport=..`.
    client_url: String,
    rt: tokio::runtime::Runtime,
    mount: Mutex<Mounted>,
    /// Directories known to exist, so a put does not walk the path with MKDIRs each time.
    dirs: Mutex<HashSet<String>>,
    tmp: TempNames,
}

/// What the URL says: host, port, NFSv4 path (starting with `/`), version preference.
#[derive(Debug, PartialEq)]
pub struct NfsUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
    pub versions: String,
}

pub fn parse_url(url: &str) -> Result<NfsUrl, String> {
    let rest = url.strip_prefix("nfs://").ok_or("not an nfs:// URL")?;
    let (loc, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (host, path) = match loc.split_once(":/") {
        Some((h, p)) => (h, format!("/{p}")),
        None => match loc.split_once('/') {
            Some((h, p)) => (h, format!("/{p}")),
            None => return Err("expected nfs://HOST:/EXPORT/PATH".into()),
        },
    };
    if host.is_empty() {
        return Err("the server is missing (nfs://HOST:/EXPORT/PATH)".into());
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{host:?} is not a host name (an IPv6 address goes in brackets; a port goes in ?nfsOptions=port=N)"
        ));
    }
    let mut port = 2049u16;
    let mut versions = "4.1,4.0".to_string();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k != "nfsOptions" {
            return Err(format!("unknown URL parameter {k:?} (only nfsOptions=...)"));
        }
        for opt in v.split(',').filter(|s| !s.is_empty()) {
            match opt.split_once('=') {
                Some(("port", p)) => {
                    port = p.parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("nfsOptions port={p:?} is not a port"))?
                }
                Some(("vers" | "nfsvers", v)) => {
                    versions = match v {
                        "4" => "4.1,4.0".into(),
                        "4.0" | "4.1" | "4.2" => v.into(),
                        _ => return Err(format!("nfsOptions vers={v:?}: only NFSv4 (4, 4.0, 4.1, 4.2) is spoken")),
                    }
                }
                _ => debug!(option = opt, "nfs mount option has no meaning for a userspace client; ignored"),
            }
        }
    }
    let path = path.trim_end_matches('/').to_string();
    let path = if path.is_empty() { "/".to_string() } else { path };
    if path.split('/').any(|c| c == "..") {
        return Err("the path must not contain ..".into());
    }
    Ok(NfsUrl { host: host.to_string(), port, path, versions })
}

/// Percent-encodes a path for the client's URL (it decodes each segment once).
fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl NfsTarget {
    pub fn new(url: &str) -> Result<NfsTarget, BackupError> {
        let u = parse_url(url).map_err(|w| BackupError::Invalid(format!("backup target {url:?}: {w}")))?;
        // A root client may take a reserved source port, which servers exporting with
        // `secure` (Linux's default) require; anyone else asks for an ordinary one.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let noresv = unsafe { libc::geteuid() } != 0;
        let client_url =
            format!("nfs://{}{}?version={}&nfsport={}&noresvport={noresv}", u.host, encode_path(&u.path), u.versions, u.port);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nfs-target")
            .enable_all()
            .build()
            .map_err(|e| BackupError::Failed(format!("backup target {url:?}: cannot start the NFS client runtime: {e}")))?;
        Ok(NfsTarget {
            url: url.to_string(),
            client_url,
            rt,
            mount: Mutex::new(Mounted::default()),
            dirs: Mutex::new(HashSet::new()),
            tmp: TempNames::new(),
        })
    }

    fn err(&self, object: &str, e: impl std::fmt::Display) -> BackupError {
        BackupError::Target { target: self.url.clone(), object: object.to_string(), what: e.to_string() }
    }

    fn map(&self, object: &str, e: nfs_rs::NfsError) -> BackupError {
        if e.is_not_found() {
            BackupError::NotFound { target: self.url.clone(), object: object.to_string() }
        } else {
            self.err(object, format!("NFS: {e}"))
        }
    }

    /// The mount, made if there is none. One thread mounts while the others wait for
    /// its result; a failure is handed to every caller for [`MOUNT_RETRY`] instead of
    /// each of them trying (and waiting) again.
    fn mount(&self, object: &str) -> Result<Arc<dyn Mount>, BackupError> {
        let mut g = self.mount.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = g.mount.as_ref() {
            return Ok(m.clone());
        }
        if let Some((at, why)) = &g.failed {
            if at.elapsed() < MOUNT_RETRY {
                return Err(self.err(object, why));
            }
        }
        let r = self.rt.block_on(async { tokio::time::timeout(MOUNT_TIMEOUT, nfs_rs::parse_url_and_mount(&self.client_url)).await });
        let m: Arc<dyn Mount> = match r {
            Ok(Ok(m)) => Arc::from(m),
            Ok(Err(e)) => {
                let why = format!("cannot mount over NFSv4 ({}): {e}", self.client_url);
                g.failed = Some((Instant::now(), why.clone()));
                return Err(self.err(object, why));
            }
            Err(_) => {
                let why = format!("no answer from the NFS server within {MOUNT_TIMEOUT:?}");
                g.failed = Some((Instant::now(), why.clone()));
                return Err(self.err(object, why));
            }
        };
        debug!(target = %self.url, version = ?m.version(), max_write = m.get_max_write_size(), "NFS backup target mounted");
        g.mount = Some(m.clone());
        g.failed = None;
        Ok(m)
    }

    /// Drops mount `failed` so the next call mounts afresh; a mount another thread
    /// already made in its place is kept.
    fn forget_mount(&self, failed: &Arc<dyn Mount>) {
        let mut g = self.mount.lock().unwrap_or_else(|p| p.into_inner());
        if g.mount.as_ref().is_some_and(|m| Arc::ptr_eq(m, failed)) {
            g.mount = None;
            self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// Runs `op` on the mount, bounded in time; retried once on a fresh mount when the
    /// connection was lost.
    fn run<T, F, Fut>(&self, object: &str, op: F) -> Result<T, BackupError>
    where
        F: Fn(Arc<dyn Mount>) -> Fut,
        Fut: Future<Output = Result<T, nfs_rs::NfsError>>,
    {
        for attempt in 0..2 {
            let m = self.mount(object)?;
            match self.rt.block_on(async { tokio::time::timeout(OP_TIMEOUT, op(m.clone())).await }) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if attempt == 0 && e.is_connection_lost() => {
                    warn!(target = %self.url, object, "NFS connection lost ({e}); mounting again");
                    self.forget_mount(&m);
                    self.remount(object)?;
                }
                Ok(Err(e)) => return Err(self.map(object, e)),
                Err(_) => {
                    self.forget_mount(&m);
                    return Err(self.err(object, format!("no answer from the NFS server within {OP_TIMEOUT:?}")));
                }
            }
        }
        Err(self.err(object, "NFS connection lost twice"))
    }

    /// Mounts again after a lost connection, trying for [`RECONNECT_WINDOW`]: a server
    /// that restarts (or fails over) within it does not fail the backup.
    fn remount(&self, object: &str) -> Result<(), BackupError> {
        let t = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.mount(object) {
                Ok(_) => return Ok(()),
                Err(e) if t.elapsed() + pause >= RECONNECT_WINDOW => return Err(e),
                Err(e) => {
                    debug!(target = %self.url, "NFS server not back yet: {e}");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Makes every directory from the root down to `dir` (a path relative to the root).
    fn make_dirs(&self, dir: &str) -> Result<(), BackupError> {
        let mut cur = String::new();
        for c in dir.split('/').filter(|c| !c.is_empty()) {
            cur = if cur.is_empty() { c.to_string() } else { format!("{cur}/{c}") };
            if self.dirs.lock().unwrap_or_else(|p| p.into_inner()).contains(&cur) {
                continue;
            }
            let full = self.path(&cur);
            self.run(&cur, |m| {
                let full = full.clone();
                async move {
                    match m.mkdir_path(&full, 0o755).await {
                        Ok(_) => Ok(()),
                        Err(e) if e.is_exist() => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            })?;
            self.dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(cur.clone());
        }
        Ok(())
    }

    /// The NFS path of object `p`, relative to the mounted path (nfs-rs resolves paths
    /// from the mounted directory).
    fn path(&self, p: &str) -> String {
        format!("/{}", p.trim_matches('/'))
    }

    fn try_put(&self, p: &str, data: &[u8]) -> Result<(), BackupError> {
        let (dir, _) = p.trim_start_matches('/').rsplit_once('/').unwrap_or(("", p));
        self.make_dirs(dir)?;
        let path = self.path(p);
        // Unique across hosts too: the server creates it UNCHECKED (no exclusive create),
        // so two writers must never share a temporary name.
        let tmp = format!("{path}{}", self.tmp.suffix());
        let body = bytes::Bytes::copy_from_slice(data);
        let r = self.run(p, |m| {
            let (tmp, path, body) = (tmp.clone(), path.clone(), body.clone());
            async move {
                let f = m.create_path(&tmp, Some(0o644)).await?;
                let w = nfs_rs::write_all(&*m, f.fh.clone(), 0, body).await;
                let c = m.close(f.fh).await;
                w?;
                c?;
                m.rename_path(&tmp, &path).await
            }
        });
        if r.is_err() {
            let _ = self.run(p, |m| {
                let tmp = tmp.clone();
                async move { m.remove_path(&tmp).await }
            });
        }
        r
    }

    /// The object at `p`, or `Err(size)` when it holds more than `max` bytes (the size
    /// the server gave, when it gave one).
    fn read_all(&self, p: &str, max: u64) -> Result<Result<Vec<u8>, Option<u64>>, BackupError> {
        let path = self.path(p);
        self.run(p, |m| {
            let path = path.clone();
            async move {
                let o = m.lookup_path(&path).await?;
                if let Some(size) = o.attr.as_ref().map(|a| a.filesize).filter(|&s| s > max) {
                    return Ok(Err(Some(size)));
                }
                let chunk = m.get_max_read_size().clamp(1, 1 << 20);
                let mut out = Vec::new();
                loop {
                    let b = m.read(o.fh.clone(), out.len() as u64, chunk).await?;
                    if b.is_empty() {
                        break;
                    }
                    // The size is the server's word; the bytes it sends are what count.
                    if (out.len() + b.len()) as u64 > max {
                        return Ok(Err(None));
                    }
                    out.extend_from_slice(&b);
                }
                Ok(Ok(out))
            }
        })
    }

    /// Entries of `dir`: (name, is a directory). A missing directory lists as empty.
    fn entries(&self, dir: &str) -> Result<Vec<(String, bool)>, BackupError> {
        use futures::StreamExt;
        let path = self.path(dir);
        let r = self.run(dir, |m| {
            let path = path.clone();
            async move {
                let mut s = m.readdirplus_path(&path).await?;
                let mut v = Vec::new();
                while let Some(e) = s.next().await {
                    let e = e?;
                    if e.file_name == "." || e.file_name == ".." || e.file_name.ends_with(".tmp") {
                        continue;
                    }
                    // A server may send any bytes; a name with a separator is no entry of a directory.
                    if e.file_name.is_empty() || e.file_name.contains('/') || e.file_name.contains('\0') {
                        warn!("skipping an entry of {path} named {:?}: not a file name", e.file_name);
                        continue;
                    }
                    let is_dir = match &e.attr {
                        Some(a) => a.type_ == NF4DIR,
                        // The server sent no attributes for it: ask.
                        None => m.getattr_path(&format!("{}/{}", path.trim_end_matches('/'), e.file_name)).await?.type_ == NF4DIR,
                    };
                    v.push((e.file_name, is_dir));
                }
                Ok(v)
            }
        });
        match r {
            Err(BackupError::NotFound { .. }) => Ok(Vec::new()),
            r => r,
        }
    }

    /// Objects under `dir`, `depth` levels down at most: a server can present a
    /// directory that contains itself.
    fn walk(&self, dir: &str, depth: usize, out: &mut Vec<String>) -> Result<(), BackupError> {
        for (name, is_dir) in self.entries(dir)? {
            let p = format!("{}/{name}", dir.trim_end_matches('/'));
            if !is_dir {
                out.push(p);
            } else if depth > 1 {
                self.walk(&p, depth - 1, out)?;
            } else {
                too_deep(&self.url, &p, depth);
            }
        }
        Ok(())
    }
}

impl BackupTarget for NfsTarget {
    fn url(&self) -> &str {
        &self.url
    }

    fn put(&self, p: &str, data: &[u8]) -> Result<(), BackupError> {
        match self.try_put(p, data) {
            // Someone removed a directory this client remembered (a `backup rm` through
            // a kernel mount, say): make it again, once.
            Err(BackupError::NotFound { .. }) => {
                self.dirs.lock().unwrap_or_else(|p| p.into_inner()).clear();
                self.try_put(p, data)
            }
            r => r,
        }
    }

    fn get(&self, p: &str, max: u64) -> Result<Vec<u8>, BackupError> {
        let r = match self.read_all(p, max) {
            // Renamed over between our LOOKUP and READ: the name now holds the new object.
            Err(BackupError::Target { what, .. }) if what.contains("stale file handle") => self.read_all(p, max),
            r => r,
        };
        r?.map_err(|size| too_large(&self.url, p, max, size))
    }

    fn exists(&self, p: &str) -> Result<bool, BackupError> {
        self.mtime(p).map(|t| t.is_some())
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        let mut v: Vec<String> = self.entries(dir)?.into_iter().map(|(n, _)| n).collect();
        v.sort();
        Ok(v)
    }

    fn list_all(&self, dir: &str, max_depth: usize) -> Result<Vec<String>, BackupError> {
        let mut v = Vec::new();
        self.walk(dir.trim_end_matches('/'), max_depth, &mut v)?;
        v.sort();
        Ok(v)
    }

    fn delete(&self, p: &str) -> Result<(), BackupError> {
        let path = self.path(p);
        match self.run(p, |m| {
            let path = path.clone();
            async move { m.remove_path(&path).await }
        }) {
            Ok(()) | Err(BackupError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn mtime(&self, p: &str) -> Result<Option<SystemTime>, BackupError> {
        let path = self.path(p);
        match self.run(p, |m| {
            let path = path.clone();
            async move { m.getattr_path(&path).await }
        }) {
            Ok(a) => Ok(Some(a.mtime.to_system_time())),
            Err(BackupError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn check(&self) -> Result<(), BackupError> {
        let base = crate::backup::store::BASE;
        self.make_dirs(base)?;
        let probe = format!("{base}/.probe-{}", std::process::id());
        self.put(&probe, b"")?;
        self.delete(&probe)
    }
}

impl Drop for NfsTarget {
    /// Gives the server its state back (the NFSv4 client ID and session) rather than
    /// leaving it to expire with the lease.
    fn drop(&mut self) {
        if let Some(m) = self.mount.get_mut().unwrap_or_else(|p| p.into_inner()).mount.take() {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), m.umount()).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("nfs://longhorn-test-nfs-svc.default:/opt/backupstore").expect("longhorn form");
        assert_eq!(u, NfsUrl { host: "longhorn-test-nfs-svc.default".into(), port: 2049, path: "/opt/backupstore".into(), versions: "4.1,4.0".into() });
        let u = parse_url("nfs://127.0.0.1:/backups/?nfsOptions=soft,timeo=150,port=20490,vers=4.0").expect("options");
        assert_eq!((u.port, u.path.as_str(), u.versions.as_str()), (20490, "/backups", "4.0"));
        assert_eq!(parse_url("nfs://h/x").expect("plain").path, "/x");
        assert_eq!(parse_url("nfs://h:/").expect("root").path, "/");
        for bad in ["nfs://:/x", "nfs://h", "nfs://h:2049:/x", "nfs://h:/x?nfsOptions=vers=3", "nfs://h:/x?nfsOptions=port=x", "nfs://h:/a/../b", "nfs://h:/x?foo=1"] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
        // A backup URL keeps the target's own options.
        let t = "nfs://h:/x?nfsOptions=port=2050";
        let b = crate::backup::backup_url(t, "vol1", "backup-1");
        assert_eq!(b, "nfs://h:/x?nfsOptions=port=2050&backup=backup-1&volume=vol1");
        assert_eq!(crate::backup::parse_backup_url(&b), Some((t.to_string(), "vol1".to_string(), "backup-1".to_string())));
        assert_eq!(encode_path("/a b/c%d#?"), "/a%20b/c%25d%23%3F");
    }
}
