//! Backups to a Longhorn-compatible backupstore, and restores from it.
//!
//! - [`store`]: the format (paths, `volume.cfg`, backup `.cfg`, block naming, locks).
//! - [`target`]: where the objects live (`file://`, `s3://`, `nfs://`), behind one trait.
//! - This module: taking a backup (in the engine, on a control thread, reading the
//!   snapshot from one healthy replica over connections of its own, never through the
//!   I/O path), restoring one into new replica directories, listing, deleting.
//!
//! A backup: lock the volume in the store (type 1); load `volume.cfg` (made on first
//! use); if its last backup is complete and its snapshot is still below ours in the
//! replica's chain, ask the replica for the ranges changed since then (else every data
//! range: a full backup); write the backup's `.cfg` with an empty `CreatedTime`; read
//! every 2 MiB block the ranges touch (four workers), name it by checksum, upload it
//! unless the store has it; merge the block list with the previous backup's; then,
//! under the store's volume.cfg lock, write the `.cfg` with `CreatedTime` (the commit
//! point) and update `volume.cfg`. One engine takes one backup at a time; backups of a
//! volume by several engines or processes may run at once (type-1 locks allow it, as
//! Longhorn's do), and the volume.cfg lock keeps their commits from losing each
//! other's `LastBackupName` and `BlockCount`.
//!
//! A restore writes into `DATA_DIR/.VOL.restoring/replica-N` and renames that to
//! `DATA_DIR/VOL` only once every block has been read, verified against its name and
//! written, so an unfinished restore is never a volume anyone can serve. Every
//! directory it makes is synced in its parent and the rename in `DATA_DIR`, so a
//! restore that reported success survives a crash.

pub mod store;
pub mod target;

use crate::volume::{Mode, Volume};
use longhorn_replica::export::{ExportRequest, SnapshotRanges};
use longhorn_replica::proto::{self, Header, Op};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use longhorn_replica::net::Stream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{BackupCfg, BlockMapping, Checksum, Compression, StoreLock, VolumeCfg, BLOCK_SIZE};
use target::BackupTarget;
use tracing::{error, info, warn};

/// Parallel block readers/uploaders per backup or restore.
const WORKERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{target}: {object} does not exist")]
    NotFound { target: String, object: String },
    #[error("{target}: {object}: {what}")]
    Target { target: String, object: String, what: String },
    #[error("{target}: {object} is corrupt: {what}")]
    Corrupt { target: String, object: String, what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

pub fn now_rfc3339() -> String {
    longhorn_replica::meta::now_rfc3339()
}

/// What `backup create` asks of the engine.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CreateRequest {
    pub target: String,
    #[serde(default)]
    pub env: HashMap<String, String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub compression: Option<String>,
    /// Tests: abort the engine after this many blocks were stored.
    #[serde(default)]
    pub crash_after_blocks: Option<u64>,
}

/// A backup's progress, as `backup-status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Progress {
    pub backup: String,
    pub volume: String,
    pub snapshot: String,
    pub target: String,
    pub url: String,
    /// `in-progress`, `complete` or `error`.
    pub state: String,
    pub error: String,
    pub incremental: bool,
    pub compression: String,
    pub blocks_total: u64,
    pub blocks_done: u64,
    /// Blocks uploaded by this backup.
    pub blocks_uploaded: u64,
    /// Blocks read but already in the store (uploaded before, or twice in this backup).
    pub blocks_existing: u64,
    pub bytes_read: u64,
    pub bytes_uploaded: u64,
    pub elapsed_ms: u64,
    /// When the backup completed (RFC 3339), "" before.
    #[serde(default)]
    pub finished_at: String,
}

struct Job {
    p: Mutex<Progress>,
}

static JOBS: Mutex<Vec<Arc<Job>>> = Mutex::new(Vec::new());

/// This engine's one running backup, claimed in `JOBS` before anything else is done so
/// that two requests (a recurring job and a manual backup, say) cannot both pass the
/// check; given back on drop unless the backup started. Backups by other engines or
/// processes may run at the same time: the store's volume.cfg lock keeps their
/// commits apart.
struct Slot(Option<Arc<Job>>);

impl Slot {
    fn claim(p: Progress) -> Result<(Slot, Arc<Job>), BackupError> {
        let mut jobs = JOBS.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.iter().any(|j| j.p.lock().unwrap_or_else(|e| e.into_inner()).state == "in-progress") {
            return Err(BackupError::Busy(format!("a backup of volume {} is already running", p.volume)));
        }
        let job = Arc::new(Job { p: Mutex::new(p) });
        jobs.push(job.clone());
        Ok((Slot(Some(job.clone())), job))
    }

    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(j) = self.0.take() {
            JOBS.lock().unwrap_or_else(|e| e.into_inner()).retain(|x| !Arc::ptr_eq(x, &j));
        }
    }
}

/// Progress of this engine's backups, newest last (`name` picks one).
pub fn status(name: Option<&str>) -> Vec<Progress> {
    let jobs = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    jobs.iter()
        .map(|j| j.p.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .filter(|p| name.is_none_or(|n| p.backup == n))
        .collect()
}

/// Longhorn's backup URL: `TARGET?backup=NAME&volume=VOL` (`&backup=...` when the
/// target URL has a query of its own, as `nfs://...?nfsOptions=...` may).
pub fn backup_url(target: &str, volume: &str, backup: &str) -> String {
    let sep = if target.contains('?') { '&' } else { '?' };
    format!("{target}{sep}backup={backup}&volume={volume}")
}

/// Splits a backup URL into (target, volume, backup); the target keeps its other
/// query parameters.
pub fn parse_backup_url(url: &str) -> Option<(String, String, String)> {
    let (t, q) = url.split_once('?')?;
    let mut vol = None;
    let mut b = None;
    let mut rest = Vec::new();
    for kv in q.split('&') {
        match kv.split_once('=') {
            Some(("volume", v)) => vol = Some(v.to_string()),
            Some(("backup", v)) => b = Some(v.to_string()),
            _ if !kv.is_empty() => rest.push(kv),
            _ => {}
        }
    }
    let target = if rest.is_empty() { t.to_string() } else { format!("{t}?{}", rest.join("&")) };
    Some((target, vol?, b?))
}

/// One request on a replica connection of the backup's own.
fn replica_call(s: &mut Stream, addr: &str, op: Op, offset: u64, count: u32, payload: &[u8]) -> Result<Vec<u8>, BackupError> {
    let fail = |what: String| BackupError::Failed(format!("replica {addr}: {op:?} at {offset}: {what}"));
    let mut buf = Vec::new();
    proto::put_frame(&mut buf, Header::request(op, 1, offset, count), payload);
    s.write_all(&buf).map_err(|e| fail(e.to_string()))?;
    let (h, p) = proto::read_frame(s).map_err(|e| fail(e.to_string()))?;
    if h.status != 0 {
        return Err(fail(String::from_utf8_lossy(&p).to_string()));
    }
    Ok(p.to_vec())
}

/// Every range of `SNAPSHOT_RANGES`, page by page (a fragmented volume has more than
/// one reply holds).
fn snapshot_ranges(s: &mut Stream, addr: &str, rq: &ExportRequest) -> Result<SnapshotRanges, BackupError> {
    let payload = serde_json::to_vec(rq).map_err(|e| BackupError::Failed(format!("encoding SnapshotRanges: {e}")))?;
    let mut out: Option<SnapshotRanges> = None;
    let mut at = 0;
    loop {
        let raw = replica_call(s, addr, Op::SnapshotRanges, at, 0, &payload)?;
        let page: SnapshotRanges = serde_json::from_slice(&raw)
            .map_err(|e| BackupError::Failed(format!("replica {addr}: bad SnapshotRanges reply: {e}")))?;
        let next = page.next;
        match &mut out {
            None => out = Some(page),
            Some(o) => o.ranges.extend(page.ranges),
        }
        match next {
            Some(n) if n > at => at = n,
            Some(n) => return Err(BackupError::Failed(format!("replica {addr}: SnapshotRanges page {n} does not move past {at}"))),
            None => break,
        }
    }
    let mut r = out.ok_or_else(|| BackupError::Failed(format!("replica {addr}: no SnapshotRanges reply")))?;
    r.next = None;
    Ok(r)
}

fn connect(v: &Volume, addr: &str) -> Result<Stream, BackupError> {
    let (s, _) = v.dialer().connect(addr).map_err(|e| BackupError::Failed(e.to_string()))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    Ok(s)
}

/// Starts a backup of `v` (see the module comment); returns once it runs.
pub fn start(v: &Arc<Volume>, req: CreateRequest) -> Result<Progress, BackupError> {
    let name = store::generate_name("backup");
    let (slot, job) = Slot::claim(Progress {
        backup: name.clone(),
        volume: v.name().to_string(),
        target: req.target.clone(),
        state: "in-progress".into(),
        ..Default::default()
    })?;
    store::check_name("volume", v.name())?;
    if v.size() % BLOCK_SIZE != 0 {
        return Err(BackupError::Invalid(format!(
            "volume {} is {} bytes, not a multiple of the 2 MiB backup block; Longhorn's backupstore cannot hold it",
            v.name(),
            v.size()
        )));
    }
    let comp = Compression::parse(req.compression.as_deref().unwrap_or("lz4"))?;
    let t: Arc<dyn BackupTarget> = Arc::from(target::open(&req.target, &req.env)?);
    // Reach the target before taking a snapshot, so a bad target changes nothing.
    t.check()?;
    let snapshot = match &req.snapshot {
        Some(s) => s.clone(),
        None => {
            let labels = Some(req.labels.clone()).filter(|l| !l.is_empty());
            v.snapshot(None, labels, true).map_err(BackupError::Failed)?.name
        }
    };
    let snaps = v.snapshot_list().map_err(BackupError::Failed)?;
    let snap = snaps
        .iter()
        .find(|s| s.name == snapshot && s.name != "volume-head")
        .ok_or_else(|| BackupError::Invalid(format!("volume {} has no snapshot {snapshot:?}", v.name())))?;
    if !snap.in_chain || snap.removed {
        return Err(BackupError::Invalid(format!("snapshot {snapshot:?} was removed or reverted away; it cannot be backed up")));
    }
    let addr = v
        .replicas
        .iter()
        .find(|(_, r)| r.mode() == Mode::RW)
        .map(|(_, r)| r.addr.clone())
        .ok_or_else(|| BackupError::Failed(format!("volume {} has no healthy replica", v.name())))?;
    let p = Progress {
        backup: name.clone(),
        volume: v.name().to_string(),
        snapshot: snapshot.clone(),
        target: req.target.clone(),
        url: backup_url(&req.target, v.name(), &name),
        state: "in-progress".into(),
        compression: comp.name().into(),
        ..Default::default()
    };
    *job.p.lock().unwrap_or_else(|e| e.into_inner()) = p.clone();
    let v2 = v.clone();
    let created = snap.created.clone();
    let r = std::thread::Builder::new().name("backup".into()).spawn(move || {
        let t0 = Instant::now();
        let r = run(&v2, &*t, t.clone(), &job, &addr, &snapshot, &created, comp, &req);
        let mut p = job.p.lock().unwrap_or_else(|e| e.into_inner());
        p.elapsed_ms = t0.elapsed().as_millis() as u64;
        match r {
            Ok(()) => {
                p.state = "complete".into();
                p.finished_at = now_rfc3339();
                info!(volume = %p.volume, backup = %p.backup, blocks = p.blocks_total, uploaded = p.blocks_uploaded,
                      existing = p.blocks_existing, ms = p.elapsed_ms, "backup complete");
            }
            Err(e) => {
                p.state = "error".into();
                p.error = e.to_string();
                error!(volume = %p.volume, backup = %p.backup, "backup failed: {e}");
            }
        }
    });
    if let Err(e) = r {
        return Err(BackupError::Failed(format!("cannot start the backup thread: {e}")));
    }
    slot.keep();
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn run(
    v: &Volume,
    t: &dyn BackupTarget,
    ta: Arc<dyn BackupTarget>,
    job: &Job,
    addr: &str,
    snapshot: &str,
    snap_created: &str,
    comp: Compression,
    req: &CreateRequest,
) -> Result<(), BackupError> {
    let vol = v.name();
    let name = job.p.lock().unwrap_or_else(|e| e.into_inner()).backup.clone();
    let _lock = StoreLock::acquire(ta.clone(), vol, store::BACKUP_LOCK)?;
    let new_volume = || VolumeCfg {
        name: vol.to_string(),
        size: v.size(),
        created_time: now_rfc3339(),
        compression_method: comp.name().into(),
        data_engine: "v1".into(),
        ..Default::default()
    };
    let vcfg = store::with_volume_cfg(&ta, vol, |c| Ok(c.get_or_insert_with(new_volume).clone()))?;
    // As Longhorn: the store's volume keeps the compression it was first backed up with.
    let comp = if vcfg.compression_method.is_empty() { comp } else { Compression::parse(&vcfg.compression_method)? };
    job.p.lock().unwrap_or_else(|e| e.into_inner()).compression = comp.name().into();
    let last = if vcfg.last_backup_name.is_empty() {
        None
    } else {
        match store::load_backup(t, vol, &vcfg.last_backup_name, Some(v.size().max(vcfg.size))) {
            Ok(b) if b.complete() && b.snapshot_name != snapshot => Some(b),
            Ok(_) => None,
            Err(e) => {
                warn!(volume = vol, "previous backup {} unreadable, taking a full backup: {e}", vcfg.last_backup_name);
                None
            }
        }
    };
    let mut s = connect(v, addr)?;
    let rq = ExportRequest { snapshot: snapshot.to_string(), since: last.as_ref().map(|b| b.snapshot_name.clone()) };
    let ranges = snapshot_ranges(&mut s, addr, &rq)?;
    let last = last.filter(|_| ranges.incremental);
    let mut blocks = BTreeSet::new();
    for &(a, b) in &ranges.ranges {
        for i in a / BLOCK_SIZE..b.div_ceil(BLOCK_SIZE) {
            blocks.insert(i);
        }
    }
    let blocks: Vec<u64> = blocks.into_iter().collect();
    {
        let mut p = job.p.lock().unwrap_or_else(|e| e.into_inner());
        p.incremental = last.is_some();
        p.blocks_total = blocks.len() as u64;
    }
    info!(volume = vol, backup = %name, snapshot, incremental = last.is_some(), blocks = blocks.len(), target = t.url(), "backup started");
    let cfg_path = store::backup_cfg_path(vol, &name);
    store::save_json(
        t,
        &cfg_path,
        &BackupCfg { name: name.clone(), volume_name: vol.to_string(), compression_method: comp.name().into(), ..Default::default() },
    )?;
    longhorn_replica::fault::point("backup:cfg-started");
    let r = upload_blocks(v, t, job, addr, snapshot, comp, &blocks, req.crash_after_blocks);
    let fresh = match r {
        Ok(f) => {
            longhorn_replica::fault::point("backup:uploaded");
            f
        }
        Err(e) => {
            // Not a backup: its blocks stay until a deletion collects what no backup uses.
            let _ = t.delete(&cfg_path);
            return Err(e);
        }
    };
    let mut merged: BTreeMap<u64, Checksum> = BTreeMap::new();
    if let Some(l) = &last {
        for b in &l.blocks {
            if b.offset < v.size() {
                merged.insert(b.offset, b.block_checksum.clone());
            }
        }
    }
    for (o, c) in fresh {
        merged.insert(o, c);
    }
    let (uploaded, bytes_up) = {
        let p = job.p.lock().unwrap_or_else(|e| e.into_inner());
        (p.blocks_uploaded, p.bytes_uploaded)
    };
    // The commit: the backup's cfg, then volume.cfg, as one change of volume.cfg.
    store::with_volume_cfg(&ta, vol, |c| {
        // Removed while we ran (by hand): made again rather than lost.
        let vcfg = c.get_or_insert_with(|| vcfg.clone());
        let now = chrono::Utc::now();
        // Strictly after the volume's last backup, whatever the clock did since.
        let unix_nano = (now.timestamp_nanos_opt().unwrap_or(0).max(0) as u64).max(vcfg.last_backup_unix_nano + 1);
        let cfg = BackupCfg {
            name: name.clone(),
            volume_name: vol.to_string(),
            snapshot_name: snapshot.to_string(),
            snapshot_created_at: snap_created.to_string(),
            created_time: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            size: merged.len() as u64 * BLOCK_SIZE,
            labels: req.labels.clone(),
            is_incremental: last.is_some(),
            volume_size: v.size(),
            volume_created_at: vcfg.created_time.clone(),
            compression_method: comp.name().into(),
            blocks: merged.into_iter().map(|(offset, block_checksum)| BlockMapping { offset, block_checksum }).collect(),
            newly_uploaded_data_size: bytes_up,
            re_uploaded_data_size: 0,
            created_time_unix_nano: unix_nano,
        };
        store::save_json(t, &cfg_path, &cfg)?;
        longhorn_replica::fault::point("backup:cfg-committed");
        vcfg.last_backup_name = name.clone();
        vcfg.last_backup_at = snap_created.to_string();
        vcfg.last_backup_unix_nano = unix_nano;
        vcfg.block_count += uploaded;
        vcfg.size = v.size();
        vcfg.labels = req.labels.clone();
        vcfg.compression_method = comp.name().into();
        Ok(())
    })?;
    longhorn_replica::fault::point("backup:volume-cfg");
    Ok(())
}

/// Reads, names and stores `blocks` (indices of 2 MiB blocks); returns (offset, checksum)
/// of each.
#[allow(clippy::too_many_arguments)]
fn upload_blocks(
    v: &Volume,
    t: &dyn BackupTarget,
    job: &Job,
    addr: &str,
    snapshot: &str,
    comp: Compression,
    blocks: &[u64],
    crash_after: Option<u64>,
) -> Result<Vec<(u64, Checksum)>, BackupError> {
    let vol = v.name();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::with_capacity(blocks.len()));
    let seen: Mutex<HashSet<Checksum>> = Mutex::new(HashSet::new());
    let stored = AtomicU64::new(0);
    let failed: Mutex<Option<BackupError>> = Mutex::new(None);
    let payload = serde_json::to_vec(&ExportRequest { snapshot: snapshot.to_string(), since: None }).unwrap_or_default();
    std::thread::scope(|sc| {
        for _ in 0..WORKERS.min(blocks.len().max(1)) {
            sc.spawn(|| {
                let r = (|| -> Result<(), BackupError> {
                    let mut s = connect(v, addr)?;
                    loop {
                        if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                            return Ok(());
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&b) = blocks.get(i) else { return Ok(()) };
                        let off = b * BLOCK_SIZE;
                        let data = replica_call(&mut s, addr, Op::SnapshotRead, off, BLOCK_SIZE as u32, &payload)?;
                        if data.len() as u64 != BLOCK_SIZE {
                            return Err(BackupError::Failed(format!("replica {addr}: short snapshot read at {off}")));
                        }
                        let c = store::checksum(&data);
                        let first = seen.lock().unwrap_or_else(|e| e.into_inner()).insert(c.clone());
                        let path = store::block_path(vol, &c);
                        let mut up = 0u64;
                        if first && !t.exists(&path)? {
                            let z = comp.compress(&data).map_err(|e| BackupError::Failed(format!("compressing block at {off}: {e}")))?;
                            t.put(&path, &z)?;
                            up = z.len() as u64;
                            let n = stored.fetch_add(1, Ordering::AcqRel) + 1;
                            if crash_after.is_some_and(|c| n >= c) {
                                eprintln!("crash_after_blocks={n}: aborting the engine");
                                std::process::abort();
                            }
                        }
                        out.lock().unwrap_or_else(|e| e.into_inner()).push((off, c));
                        let mut p = job.p.lock().unwrap_or_else(|e| e.into_inner());
                        p.blocks_done += 1;
                        p.bytes_read += BLOCK_SIZE;
                        if up > 0 {
                            p.blocks_uploaded += 1;
                            p.bytes_uploaded += up;
                        } else {
                            p.blocks_existing += 1;
                        }
                    }
                })();
                if let Err(e) = r {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    if f.is_none() {
                        *f = Some(e);
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(out.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// One backup, as `backup ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupInfo {
    pub name: String,
    pub volume: String,
    pub snapshot: String,
    pub snapshot_created_at: String,
    pub created: String,
    /// Completion in nanoseconds since the epoch (`CreatedTime`'s second when Longhorn
    /// took it, 0 while incomplete): what orders the backups of a volume.
    pub created_unix_nano: u64,
    /// `complete`, or `incomplete` (in progress, or interrupted).
    pub state: String,
    pub size: u64,
    pub blocks: usize,
    pub incremental: bool,
    pub compression: String,
    pub labels: HashMap<String, String>,
    pub url: String,
}

/// One backup volume, as `backup volumes` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub created_at: String,
    pub last_backup_name: String,
    pub last_backup_at: String,
    /// When this listing read the store.
    pub last_synced_at: String,
    pub block_count: u64,
    pub compression: String,
}

pub fn list_volumes(t: &dyn BackupTarget) -> Result<Vec<VolumeInfo>, BackupError> {
    let now = now_rfc3339();
    let mut out = Vec::new();
    for v in store::list_volumes(t)? {
        match store::load_volume(t, &v) {
            Ok(c) => out.push(VolumeInfo {
                name: c.name,
                size: c.size,
                created_at: c.created_time,
                last_backup_name: c.last_backup_name,
                last_backup_at: c.last_backup_at,
                last_synced_at: now.clone(),
                block_count: c.block_count,
                compression: c.compression_method,
            }),
            Err(e) => warn!("skipping backup volume {v}: {e}"),
        }
    }
    Ok(out)
}

pub fn list_backups(t: &dyn BackupTarget, volume: Option<&str>) -> Result<Vec<BackupInfo>, BackupError> {
    let vols = match volume {
        Some(v) => {
            store::check_name("volume", v)?;
            vec![v.to_string()]
        }
        None => store::list_volumes(t)?,
    };
    let mut out = Vec::new();
    for v in vols {
        let vsize = store::volume_size(t, &v);
        for b in store::list_backups(t, &v)? {
            match store::load_backup(t, &v, &b, vsize) {
                Ok(c) => out.push(BackupInfo {
                    url: backup_url(t.url(), &v, &c.name),
                    created_unix_nano: c.order().0,
                    state: if c.complete() { "complete" } else { "incomplete" }.into(),
                    name: c.name,
                    volume: v.clone(),
                    snapshot: c.snapshot_name,
                    snapshot_created_at: c.snapshot_created_at,
                    created: c.created_time,
                    size: c.size,
                    blocks: c.blocks.len(),
                    incremental: c.is_incremental,
                    compression: c.compression_method,
                    labels: c.labels,
                }),
                Err(e) => warn!("skipping backup {b} of {v}: {e}"),
            }
        }
    }
    out.sort_by(|a, b| (&a.volume, a.created_unix_nano, &a.name).cmp(&(&b.volume, b.created_unix_nano, &b.name)));
    Ok(out)
}

/// Finds the volume that holds backup `name`.
pub fn find_backup(t: &dyn BackupTarget, name: &str) -> Result<String, BackupError> {
    store::check_name("backup", name)?;
    for v in store::list_volumes(t)? {
        if t.exists(&store::backup_cfg_path(&v, name))? {
            return Ok(v);
        }
    }
    Err(BackupError::Invalid(format!("no backup named {name:?} in {}", t.url())))
}

/// The latest backup of `volume`: `volume.cfg`'s `LastBackupName`, as Longhorn's UI
/// takes it; the last complete one in [`BackupCfg::order`] when that names none.
pub fn latest_backup(t: &dyn BackupTarget, volume: &str) -> Result<String, BackupError> {
    store::check_name("volume", volume)?;
    match store::load_volume(t, volume) {
        Ok(v) if !v.last_backup_name.is_empty() => match store::load_backup(t, volume, &v.last_backup_name, Some(v.size)) {
            Ok(b) if b.complete() => return Ok(b.name),
            Ok(_) => warn!(volume, "LastBackupName {} is not complete; taking the newest complete backup", v.last_backup_name),
            Err(e) => warn!(volume, "LastBackupName {}: {e}; taking the newest complete backup", v.last_backup_name),
        },
        Ok(_) | Err(BackupError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    list_backups(t, Some(volume))?
        .into_iter()
        .filter(|b| b.state == "complete")
        .next_back()
        .map(|b| b.name)
        .ok_or_else(|| BackupError::Invalid(format!("volume {volume:?} has no complete backup in {}", t.url())))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResult {
    pub backup: String,
    pub volume: String,
    pub blocks_removed: u64,
    pub blocks_left: u64,
}

/// Removes backup `name` of `volume` and every block no remaining backup uses.
pub fn delete_backup(t: Arc<dyn BackupTarget>, volume: &str, name: &str) -> Result<DeleteResult, BackupError> {
    store::check_name("volume", volume)?;
    store::check_name("backup", name)?;
    let cfg_path = store::backup_cfg_path(volume, name);
    if !t.exists(&cfg_path)? {
        return Err(BackupError::Invalid(format!("volume {volume:?} has no backup {name:?} in {}", t.url())));
    }
    let _lock = StoreLock::acquire(t.clone(), volume, store::DELETION_LOCK)?;
    t.delete(&cfg_path)?;
    let vsize = store::volume_size(&*t, volume);
    let mut used: HashSet<Checksum> = HashSet::new();
    let mut remaining = Vec::new();
    let mut unreadable = false;
    for b in store::list_backups(&*t, volume)? {
        match store::load_backup(&*t, volume, &b, vsize) {
            Ok(c) => {
                used.extend(c.blocks.iter().map(|m| m.block_checksum.clone()));
                remaining.push(c);
            }
            Err(e) => {
                warn!(volume, "backup {b} is unreadable; no block is collected this time: {e}");
                unreadable = true;
            }
        }
    }
    let all = store::list_blocks(&*t, volume)?;
    let mut removed = 0;
    if !unreadable {
        for c in &all {
            if !used.contains(c) {
                t.delete(&store::block_path(volume, c))?;
                removed += 1;
            }
        }
    }
    let r = store::with_volume_cfg(&t, volume, |c| {
        if let Some(v) = c.as_mut() {
            if v.last_backup_name == name {
                let latest = remaining.iter().filter(|b| b.complete()).max_by(|a, b| a.order().cmp(&b.order()));
                v.last_backup_name = latest.map(|b| b.name.clone()).unwrap_or_default();
                v.last_backup_at = latest.map(|b| b.snapshot_created_at.clone()).unwrap_or_default();
            }
            v.block_count = all.len() as u64 - removed;
        }
        Ok(())
    });
    match r {
        // The backup is gone all the same; what lists the store says the same of volume.cfg.
        Err(e @ BackupError::Corrupt { .. }) => warn!(volume, "volume.cfg not updated: {e}"),
        r => r?,
    }
    info!(volume, backup = name, blocks_removed = removed, "backup deleted");
    Ok(DeleteResult { backup: name.into(), volume: volume.into(), blocks_removed: removed, blocks_left: all.len() as u64 - removed })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreResult {
    pub volume: String,
    pub size: u64,
    pub from: String,
    pub blocks: usize,
    pub bytes_read: u64,
    pub elapsed_ms: u64,
    pub dir: PathBuf,
}

/// Restores backup `name` of `volume` into `data_dir/new_volume/replica-N` (N
/// replicas), verifying every block against its name. `progress(done, total)` is
/// called as blocks land.
pub fn restore(
    t: Arc<dyn BackupTarget>,
    volume: &str,
    name: &str,
    data_dir: &Path,
    new_volume: &str,
    replicas: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<RestoreResult, BackupError> {
    store::check_name("volume", volume)?;
    store::check_name("backup", name)?;
    store::check_name("volume", new_volume)?;
    let t0 = Instant::now();
    let dest = data_dir.join(new_volume);
    if dest.exists() {
        return Err(BackupError::Invalid(format!("{} exists: volume {new_volume:?} is already there", dest.display())));
    }
    let cfg = store::load_backup(&*t, volume, name, store::volume_size(&*t, volume))?;
    if !cfg.complete() {
        return Err(BackupError::Invalid(format!("backup {name} of {volume} is not complete (in progress or interrupted)")));
    }
    let comp = Compression::parse(&cfg.compression_method)?;
    let size = if cfg.volume_size > 0 { cfg.volume_size } else { store::load_volume(&*t, volume)?.size };
    if size == 0 || size % BLOCK_SIZE != 0 {
        return Err(BackupError::Corrupt {
            target: t.url().into(),
            object: store::backup_cfg_path(volume, name),
            what: format!("volume size {size} is not a multiple of 2 MiB"),
        });
    }
    if let Some(b) = cfg.blocks.iter().find(|b| b.offset % BLOCK_SIZE != 0 || b.offset >= size) {
        return Err(BackupError::Corrupt {
            target: t.url().into(),
            object: store::backup_cfg_path(volume, name),
            what: format!("block entry at offset {} ({}) is out of place", b.offset, b.block_checksum),
        });
    }
    let _lock = StoreLock::acquire(t.clone(), volume, store::BACKUP_LOCK)?;
    let tmp = data_dir.join(format!(".{new_volume}.restoring"));
    let io = |p: &Path, e: std::io::Error| BackupError::Failed(format!("{}: {e}", p.display()));
    if tmp.exists() {
        warn!(dir = %tmp.display(), "removing an unfinished restore");
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    let r = (|| -> Result<u64, BackupError> {
        let mut stores = Vec::new();
        for i in 0..replicas.max(1) {
            let d = tmp.join(format!("replica-{i}"));
            // The replica syncs its files in d; d's own entry, and tmp's, are ours.
            target::file::create_dirs_synced(&d).map_err(|e| io(&d, e))?;
            longhorn_replica::Store::create(&d, new_volume, size).map_err(|e| BackupError::Failed(e.to_string()))?;
            stores.push(longhorn_replica::Store::open(&d, Some(new_volume)).map_err(|e| BackupError::Failed(e.to_string()))?);
        }
        let next = AtomicUsize::new(0);
        let done = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let failed: Mutex<Option<BackupError>> = Mutex::new(None);
        let total = cfg.blocks.len() as u64;
        std::thread::scope(|sc| {
            for _ in 0..WORKERS {
                sc.spawn(|| loop {
                    if failed.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(b) = cfg.blocks.get(i) else { return };
                    let r = store::read_block(&*t, volume, &b.block_checksum, comp).and_then(|data| {
                        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        // A fresh volume reads holes as zeros: zero blocks stay holes.
                        if data.iter().any(|&x| x != 0) {
                            for s in &stores {
                                s.write(b.offset, &data).map_err(|e| {
                                    BackupError::Failed(format!("writing block {} at {} to {}: {e}", b.block_checksum, b.offset, s.dir().display()))
                                })?;
                            }
                        }
                        Ok(())
                    });
                    match r {
                        Ok(()) => progress(done.fetch_add(1, Ordering::AcqRel) + 1, total),
                        Err(e) => {
                            let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                            f.get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        for s in &stores {
            s.flush().map_err(|e| BackupError::Failed(format!("{}: flush: {e}", s.dir().display())))?;
            s.close().map_err(|e| BackupError::Failed(e.to_string()))?;
        }
        Ok(bytes.load(Ordering::Acquire))
    })();
    let bytes_read = match r {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    longhorn_replica::fault::point("restore:written");
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    longhorn_replica::fault::point("restore:renamed");
    target::file::sync_dir(data_dir).map_err(|e| io(data_dir, e))?;
    let res = RestoreResult {
        volume: new_volume.into(),
        size,
        from: backup_url(t.url(), volume, name),
        blocks: cfg.blocks.len(),
        bytes_read,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        dir: dest,
    };
    info!(volume = new_volume, from = %res.from, blocks = res.blocks, ms = res.elapsed_ms, "restore complete");
    Ok(res)
}
