//! Online rebuild of a replica from a healthy one, replica to replica.
//!
//! The engine, with I/O paused, takes a system snapshot `S` on the healthy replicas
//! and calls `begin_rebuild(S)` on the new one: it gets an empty head whose parent is
//! `S`, `Rebuilding: true` in volume.meta (so no engine trusts it after a crash), and
//! the revision counter of the healthy ones. From then on it receives every write
//! (mode WO). `sync_from` then pulls the files of the chain up to `S` from the source:
//! data extents only, each range compared by SHA-256 first when the file already exists
//! here (a replica coming back with its old directory), holes punched. `finish_rebuild`
//! swaps in the full chain, replays the partial-block writes it had to hold back, and
//! commits volume.meta with `Rebuilding: false`.
//!
//! Why partial-block writes are held back: a write covering part of a 4 KiB block is
//! widened with the block's current content read through the chain, and the lower
//! layers are not here yet. Such writes are kept in order and replayed once they are;
//! a later whole-block write drops the held ones it covers. TRIM is skipped while
//! rebuilding (its result is unspecified anyway).

use crate::meta::{self, DiskMeta, LayerKind, MetaError};
use crate::auth::{self, Credentials};
use crate::proto::{self, Header, Op};
use crate::store::{self, Chain, Maps, Store, StoreError, BLOCK};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::OpenOptions;
use std::io::{self, Write};
use crate::net::Stream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::RwLock;
use std::time::{Duration, Instant};
use tracing::info;

/// Transfer unit: big enough to stream, small enough to skip unchanged parts.
const CHUNK: u64 = 2 << 20;
/// Partial-block writes held during a rebuild before it gives up.
const MAX_HELD_BYTES: usize = 256 << 20;

pub(crate) struct RebuildState {
    pub(crate) snapshot: String,
    pub(crate) new_head: String,
    pub(crate) held: Vec<(u64, Vec<u8>)>,
    pub(crate) held_bytes: usize,
    pub(crate) old_head: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RebuildProgress {
    pub active: bool,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes actually transferred (the rest matched by checksum).
    pub bytes_sent: u64,
    pub elapsed_ms: u64,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BeginRebuild {
    pub snapshot: String,
    pub revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub source: String,
    pub files: Vec<DiskMeta>,
}

/// Reply of `FILE_EXTENTS`: one page of a layer's data extents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExtentsPage {
    pub extents: Vec<(u64, u64)>,
    /// Where the next page starts, when there is one.
    pub next: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRequest {
    pub file: String,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl Store {
    // ---- source side ----

    /// The chain below the head, oldest first.
    pub fn chain_files(&self) -> Result<Vec<DiskMeta>, StoreError> {
        let names: Vec<String> = {
            let c = self.chain.read().unwrap_or_else(|p| p.into_inner());
            c.layers[..c.layers.len() - 1].iter().map(|l| l.name.clone()).collect()
        };
        names.iter().map(|n| DiskMeta::load(self.dir(), n).map_err(StoreError::from)).collect()
    }

    /// Runs `f` on snapshot layer `file` (never the head, which changes under I/O).
    fn with_layer<T>(&self, file: &str, f: impl FnOnce(&store::Layer) -> io::Result<T>) -> io::Result<T> {
        let c = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let last = c.layers.len() - 1;
        match c.layers.iter().position(|l| l.name == file) {
            Some(i) if i < last => f(&c.layers[i]),
            Some(_) => Err(bad(format!("{file} is the head; only snapshots can be copied"))),
            None => Err(bad(format!("{file} is not in this replica's chain"))),
        }
    }

    /// The data extents of snapshot layer `file` from `start` on, at most `max` (and at
    /// most [`crate::export::MAX_RANGES_PER_REPLY`]) of them.
    pub fn file_extents(&self, file: &str, start: u64, max: usize) -> io::Result<ExtentsPage> {
        let size = self.size();
        let max = max.clamp(1, crate::export::MAX_RANGES_PER_REPLY);
        self.with_layer(file, |l| {
            let (extents, more) = store::data_ranges(&l.file, start.min(size), size, max)?;
            let next = if more { extents.last().map(|e| e.1) } else { None };
            Ok(ExtentsPage { extents, next })
        })
    }

    pub fn read_file(&self, file: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.size()) || len as u64 > CHUNK * 2 {
            return Err(bad(format!("range {offset}+{len} of {file} is out of bounds")));
        }
        self.with_layer(file, |l| {
            let mut b = vec![0u8; len];
            l.file.read_exact_at(&mut b, offset).map_err(|e| store::io_err(l, offset, e))?;
            Ok(b)
        })
    }

    pub fn hash_file(&self, file: &str, offset: u64, len: usize) -> io::Result<String> {
        let b = self.read_file(file, offset, len)?;
        Ok(hex(&Sha256::digest(&b)))
    }

    // ---- target side ----

    pub fn is_rebuilding(&self) -> bool {
        self.rebuilding.load(Ordering::Acquire)
    }

    /// Starts a rebuild onto snapshot file `snapshot` (see the module comment).
    pub fn begin_rebuild(&self, b: &BeginRebuild) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        if meta::check_layer_name(&b.snapshot) != Ok(LayerKind::Snapshot) {
            return Err(StoreError::Layout { path: dir, what: format!("RebuildBegin: {:?} is not a snapshot layer name", b.snapshot) });
        }
        let mut chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        let mut vm = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let cur = chain.head().name.clone();
        let n = meta::head_number(&cur).ok_or_else(|| StoreError::Layout { path: dir.clone(), what: "head has no number".into() })?;
        // The head on disk stays the committed one until the rebuild finishes.
        let old_head = st.as_ref().map(|s| s.old_head.clone()).unwrap_or_else(|| vm.head.clone());
        let new_head = meta::head_name(n + 1);
        let path = dir.join(&new_head);
        let _ = std::fs::remove_file(&path);
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| MetaError::io(&path, e))?;
        f.set_len(self.size()).map_err(|e| MetaError::io(&path, e))?;
        DiskMeta {
            name: new_head.clone(),
            recorded_name: String::new(),
            parent: b.snapshot.clone(),
            removed: false,
            user_created: false,
            created: meta::now_rfc3339(),
            labels: None,
        }
        .store(&dir)?;
        let mut next = vm.clone();
        next.rebuilding = true;
        next.dirty = true;
        next.store(&dir)?;
        *vm = next;
        // Rewritten from a healthy replica from here on: a failed sync of what it held
        // before no longer speaks against it (a disk still failing fails the next one).
        *self.sync_failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.set_revision(b.revision);
        *chain = Chain {
            layers: vec![store::Layer { name: new_head.clone(), path, file: std::sync::Arc::new(f) }],
            maps: RwLock::new(Maps { top: crate::extent::ExtentMap::new(), below: crate::extent::ExtentMap::new() }),
        };
        *st = Some(RebuildState { snapshot: b.snapshot.clone(), new_head, held: Vec::new(), held_bytes: 0, old_head });
        self.rebuilding.store(true, Ordering::Release);
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = RebuildProgress { active: true, ..Default::default() };
        info!(dir = %dir.display(), snapshot = %b.snapshot, revision = b.revision, "rebuild started; receiving writes");
        Ok(())
    }

    /// Holds the partial-block edges of a write made while rebuilding; returns the
    /// block-aligned middle, which can be written now.
    pub(crate) fn hold_edges(&self, offset: u64, data: &[u8]) -> io::Result<Option<(u64, u64)>> {
        let end = offset + data.len() as u64;
        let (a, b) = (offset.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
        let mut st = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = st.as_mut() else { return Ok(Some((offset, end))) };
        let mut hold = |o: u64, e: u64| -> io::Result<()> {
            if o < e {
                s.held.push((o, data[(o - offset) as usize..(e - offset) as usize].to_vec()));
                s.held_bytes += (e - o) as usize;
            }
            Ok(())
        };
        if a >= b {
            hold(offset, end)?;
            return Ok(None);
        }
        hold(offset, a)?;
        hold(b, end)?;
        // Whole blocks written now supersede what held pieces hold inside them: replayed
        // later, those bytes would overwrite this newer write. A piece may straddle a
        // block boundary, so it is cut, not only dropped.
        let mut kept = Vec::with_capacity(s.held.len());
        for (o, d) in std::mem::take(&mut s.held) {
            let e = o + d.len() as u64;
            if e <= a || o >= b {
                kept.push((o, d));
                continue;
            }
            if o < a {
                kept.push((o, d[..(a - o) as usize].to_vec()));
            }
            if e > b {
                kept.push((b, d[(b - o) as usize..].to_vec()));
            }
        }
        s.held = kept;
        s.held_bytes = s.held.iter().map(|(_, d)| d.len()).sum();
        if s.held_bytes > MAX_HELD_BYTES {
            return Err(io::Error::other("too many partial-block writes held during the rebuild"));
        }
        Ok(Some((a, b)))
    }

    /// Pulls the chain files from `req.source`, then finishes the rebuild. `key` is the
    /// volume's secret, proven to the source.
    pub fn sync_from(&self, req: &SyncRequest, key: Option<std::sync::Arc<auth::Key>>) -> Result<RebuildProgress, StoreError> {
        let t = Instant::now();
        let r = self.pull_files(req, t, &Credentials::peer(key));
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.elapsed_ms = t.elapsed().as_millis() as u64;
        match r {
            Ok(()) => {
                drop(p);
                crate::fault::point("rebuild:pulled");
                self.finish_rebuild()?;
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                p.active = false;
                Ok(p.clone())
            }
            Err(e) => {
                p.active = false;
                p.error = e.to_string();
                Err(e)
            }
        }
    }

    fn pull_files(&self, req: &SyncRequest, t: Instant, creds: &Credentials) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        check_sync_request(req).map_err(|what| StoreError::Layout { path: dir.clone(), what: format!("RebuildSync refused: {what}") })?;
        let (want, old_head) = {
            let st = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
            (st.as_ref().map(|s| s.snapshot.clone()), st.as_ref().map(|s| s.old_head.clone()))
        };
        match (want, req.files.last()) {
            (Some(w), Some(last)) if last.name == w => {}
            (w, _) => {
                return Err(StoreError::Layout {
                    path: dir,
                    what: format!("sync files must end at the rebuild snapshot {w:?}"),
                })
            }
        }
        let mut src = Source::connect(&req.source, self.volume(), self.size(), creds)
            .map_err(|e| StoreError::Io { path: dir.clone(), offset: 0, source: e })?;
        let mut extents = Vec::new();
        for f in &req.files {
            let e = src.extents(&f.name).map_err(|e| StoreError::Io { path: dir.join(&f.name), offset: 0, source: e })?;
            check_extents(&e, self.size()).map_err(|what| StoreError::Layout {
                path: dir.join(&f.name),
                what: format!("source replica {}: extents of {}: {what}", req.source, f.name),
            })?;
            extents.push(e);
        }
        {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.bytes_total = extents.iter().flatten().map(|(a, b)| b - a).sum();
        }
        for (f, ext) in req.files.iter().zip(extents) {
            let path = dir.join(&f.name);
            let ioe = |off: u64, e: io::Error| StoreError::Io { path: path.clone(), offset: off, source: e };
            // A replica coming back after being cut off holds, in its old head, most of
            // what became the rebuild snapshot on the others: start from it (a second
            // name for the same file), so only what changed since is sent. The old head
            // is deleted when the rebuild finishes, and until then volume.meta says
            // Rebuilding, so no engine trusts what the copy does to it.
            if !path.exists() && Some(&f.name) == req.files.last().map(|l| &l.name) {
                if let Some(h) = old_head.as_ref().filter(|h| dir.join(h).exists()) {
                    std::fs::hard_link(dir.join(h), &path).map_err(|e| ioe(0, e))?;
                    info!(dir = %dir.display(), from = %h, to = %f.name, "rebuild starts from the old head");
                }
            }
            let existed = path.exists();
            let file = OpenOptions::new().read(true).write(true).create(true).open(&path).map_err(|e| ioe(0, e))?;
            file.set_len(self.size()).map_err(|e| ioe(0, e))?;
            if existed {
                // Punch whatever the source does not hold.
                let mut pos = 0;
                for &(a, b) in ext.iter().chain(std::iter::once(&(self.size(), self.size()))) {
                    if a > pos {
                        store::punch_hole(&file, pos, a - pos).map_err(|e| ioe(pos, e))?;
                    }
                    pos = b;
                }
            }
            for (a, b) in ext {
                let mut off = a;
                while off < b {
                    let n = (b - off).min(CHUNK) as usize;
                    let same = existed && {
                        let mut local = vec![0u8; n];
                        file.read_exact_at(&mut local, off).map_err(|e| ioe(off, e))?;
                        let theirs = src.hash(&f.name, off, n).map_err(|e| ioe(off, e))?;
                        hex(&Sha256::digest(&local)) == theirs
                    };
                    if !same {
                        let data = src.read(&f.name, off, n).map_err(|e| ioe(off, e))?;
                        file.write_all_at(&data, off).map_err(|e| ioe(off, e))?;
                    }
                    let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                    p.bytes_done += n as u64;
                    if !same {
                        p.bytes_sent += n as u64;
                    }
                    p.elapsed_ms = t.elapsed().as_millis() as u64;
                    off += n as u64;
                }
            }
            file.sync_all().map_err(|e| ioe(0, e))?;
            f.store(&dir)?;
        }
        meta::sync_dir(&dir)?;
        Ok(())
    }

    /// Swaps in the synced chain, replays held writes, commits `Rebuilding: false`.
    fn finish_rebuild(&self) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        let mut chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        let mut vm = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = self.rebuild.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(StoreError::Layout { path: dir, what: "no rebuild in progress".into() });
        };
        let mut next = vm.clone();
        next.head = st.new_head.clone();
        next.parent = st.snapshot.clone();
        let full = store::load_chain(&dir, &next)?;
        *chain = full;
        self.rebuilding.store(false, Ordering::Release);
        for (off, data) in &st.held {
            self.write_locked(&chain, *off, data).map_err(|e| StoreError::Io { path: dir.clone(), offset: *off, source: e })?;
        }
        chain.head().file.sync_data().map_err(|e| StoreError::Io { path: chain.head().path.clone(), offset: 0, source: e })?;
        crate::fault::point("rebuild:replayed");
        next.rebuilding = false;
        next.store(&dir)?;
        crate::fault::point("rebuild:committed");
        *vm = next;
        if st.old_head != st.new_head {
            let _ = std::fs::remove_file(dir.join(&st.old_head));
            let _ = std::fs::remove_file(DiskMeta::path(&dir, &st.old_head));
        }
        crate::snapshot::remove_leftovers(&dir, &chain);
        drop_off_chain(&dir, &chain);
        crate::fault::point("rebuild:cleaned");
        info!(dir = %dir.display(), held = st.held.len(), "rebuild finished; chain complete");
        Ok(())
    }

    pub fn rebuild_progress(&self) -> RebuildProgress {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Removes the snapshot layers of `dir` that are not in `chain`. A replica that comes
/// back with its directory may hold snapshots of its own past that the source's chain
/// does not have (one the others removed while it was down, a branch): kept, such a
/// layer is one more child of its parent here and nowhere else, and a later removal of
/// that parent only marks it here while the others merge it, so the chains part. A
/// rebuilt replica holds the source's chain and nothing else.
fn drop_off_chain(dir: &std::path::Path, chain: &Chain) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let img = n.strip_suffix(".meta").unwrap_or(&n);
        if meta::check_layer_name(img) == Ok(LayerKind::Snapshot) && !chain.layers.iter().any(|l| l.name == img) {
            info!(dir = %dir.display(), file = %n, "removing a snapshot file the rebuilt chain does not have");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What a rebuild may be told to copy: snapshot layers only (the head is this replica's
/// own), forming one chain from the bottom, from a source given as `host:port`. The
/// request comes from the network, and each name becomes a path here.
fn check_sync_request(req: &SyncRequest) -> Result<(), String> {
    check_addr(&req.source)?;
    if req.files.is_empty() || req.files.len() >= store::MAX_LAYERS {
        return Err(format!("{} files; a chain has 1 to {} layers below its head", req.files.len(), store::MAX_LAYERS - 1));
    }
    let mut parent = "";
    for f in &req.files {
        if meta::check_layer_name(&f.name)? != LayerKind::Snapshot {
            return Err(format!("{:?} is not a snapshot layer; only snapshots are copied", f.name));
        }
        if !f.recorded_name.is_empty() {
            meta::check_layer_name(&f.recorded_name)?;
        }
        if f.parent != parent {
            return Err(format!("{:?} has Parent {:?}, expected {parent:?}: the files are not one chain from the bottom", f.name, f.parent));
        }
        parent = &f.name;
    }
    Ok(())
}

/// A replica address: `host:port`, or `[v6]:port`, with a host of letters, digits, `.`,
/// `-` (or an IPv6 literal) and a non-zero port; or `unix:PATH` with an absolute path
/// that fits a socket address.
pub fn check_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return Ok(());
    }
    if let Some(p) = crate::net::unix_path(addr) {
        let s = p.as_os_str().as_encoded_bytes();
        // sun_path is 108 bytes with the terminating NUL.
        return if p.is_absolute() && s.len() < 108 && !s.contains(&0) {
            Ok(())
        } else {
            Err(format!("source address {addr:?}: a unix socket path must be absolute, under 108 bytes, without NUL"))
        };
    }
    let bad = || format!("source address {addr:?} is not host:port or unix:PATH");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && !host.starts_with('-');
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Extents from a source: sorted, disjoint, block-aligned, inside the volume.
fn check_extents(e: &[(u64, u64)], size: u64) -> Result<(), String> {
    let mut end = 0;
    for &(a, b) in e {
        if a < end || a >= b || b > size || a % BLOCK != 0 || (b % BLOCK != 0 && b != size) {
            return Err(format!("range [{a}, {b}) is not a sorted, block-aligned range inside the volume of {size} bytes"));
        }
        end = b;
    }
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A client of the source replica.
struct Source {
    s: Stream,
    addr: String,
    next: u64,
}

impl Source {
    /// Connects as a rebuild peer, proving (and checking) the volume's secret.
    fn connect(addr: &str, volume: &str, size: u64, creds: &Credentials) -> io::Result<Source> {
        let mut s = Stream::connect(addr, Duration::from_secs(5))
            .map_err(|e| io::Error::new(e.kind(), format!("source replica: {e}")))?;
        // The handshake also checks that whatever answers is a replica of this very volume.
        let info = auth::client_handshake(&mut s, volume, size, creds).map_err(|e| e.into_io(addr))?;
        if info.rebuilding {
            return Err(io::Error::other(format!("source replica {addr} is itself being rebuilt")));
        }
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(Source { s, addr: addr.to_string(), next: 1 })
    }

    fn call(&mut self, op: Op, offset: u64, count: u32, file: &str) -> io::Result<bytes::Bytes> {
        let payload = serde_json::to_vec(&FileRequest { file: file.to_string() }).map_err(io::Error::other)?;
        let id = self.next;
        self.next += 1;
        let mut b = Vec::new();
        proto::put_frame(&mut b, Header::request(op, id, offset, count), &payload);
        self.s.write_all(&b)?;
        let (h, p) = proto::read_frame(&mut self.s).map_err(|e| io::Error::other(format!("source replica {}: {e}", self.addr)))?;
        if h.status != 0 || h.id != id {
            return Err(io::Error::other(format!("source replica {}: {op:?} {file}: {}", self.addr, String::from_utf8_lossy(&p))));
        }
        Ok(p)
    }

    /// Every data extent of `file`, page by page.
    fn extents(&mut self, file: &str) -> io::Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        loop {
            let p = self.call(Op::FileExtents, at, 0, file)?;
            let page: ExtentsPage = serde_json::from_slice(&p)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("extents of {file}: {e}")))?;
            out.extend(page.extents);
            match page.next {
                // Each page must move forward, or a hostile source could loop us forever.
                Some(n) if n > at => at = n,
                Some(n) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("extents of {file}: next page {n} does not move past {at}")))
                }
                None => return Ok(out),
            }
        }
    }

    fn read(&mut self, file: &str, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        let p = self.call(Op::FileRead, offset, len as u32, file)?;
        if p.len() != len {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{file}: short read from the source")));
        }
        Ok(p)
    }

    fn hash(&mut self, file: &str, offset: u64, len: usize) -> io::Result<String> {
        let p = self.call(Op::FileHash, offset, len as u32, file)?;
        Ok(String::from_utf8_lossy(&p).to_string())
    }
}
