//! Chain changes on a replica: snapshot (head rotation), removal with merge, revert,
//! and the clean-up of what a crash in the middle of one leaves behind.
//!
//! Every change is a sequence of steps whose commit point is one atomic rename of a
//! meta file, ordered so that a crash at any step reopens to the old chain or the new
//! one with the same data (the `fault` points let tests crash at each step):
//!
//! Rotation (snapshot `S` of head `H` = volume-head-N.img):
//!   1. fdatasync H.
//!   2. create volume-head-(N+1).img and its meta (Parent = volume-snap-S.img).
//!   3. write volume-snap-S.img.meta (Parent = H's parent).
//!   4. hard-link H as volume-snap-S.img (the same inode under a second name).
//!   5. COMMIT: volume.meta names the new head.
//!   6. unlink H's old name and its meta.
//!   Before 5, the new head and any snapshot name linked to the head's inode are
//!   leftovers; after 5, the old head name is. `remove_leftovers` deletes them at open.
//!
//! Removal of snapshot `S` whose only child `C` is a snapshot (merge):
//!   1. mark S Removed.
//!   2. copy S's data into C wherever C has a hole (C's content as seen through the
//!      chain is unchanged: it showed S's data there). Zero blocks are copied as data.
//!   3. fdatasync C. 4. COMMIT: C's meta names S's parent. 5. delete S.
//!   After 4, S is unreferenced, Removed, and no one's parent: a leftover.
//! Removal of `S` whose child is the head: S stays in the chain, marked Removed, and
//! only the blocks the head covers (which no read can reach) are punched out of S.
//!
//! Revert to `S`: create a new head with Parent S, COMMIT volume.meta, delete the old
//! head. Snapshots above S stay on disk and listed, on a branch the chain no longer
//! reads.

use crate::meta::{self, DiskMeta, MetaError, VolumeMeta};
use crate::store::{self, punch_hole, Chain, Store, StoreError, BLOCK};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use tracing::{info, warn};

pub use crate::meta::{snap_file, snap_name, SNAP_PREFIX};

/// Snapshot names (see [`meta::check_snapshot_name`]).
pub fn check_name(name: &str) -> Result<(), String> {
    meta::check_snapshot_name(name)
}

pub use crate::fault::point as fault;

/// Creates an empty head file of `size` bytes and its meta naming `parent`, both synced.
fn new_head_file(dir: &Path, name: &str, parent: &str, size: u64, created: &str) -> Result<File, StoreError> {
    let path = dir.join(name);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| MetaError::io(&path, e))?;
    f.set_len(size).map_err(|e| MetaError::io(&path, e))?;
    f.sync_all().map_err(|e| MetaError::io(&path, e))?;
    DiskMeta {
        name: name.to_string(),
        recorded_name: String::new(),
        parent: parent.to_string(),
        removed: false,
        user_created: false,
        created: created.to_string(),
        labels: None,
    }
    .store(dir)?;
    Ok(f)
}

/// The files of a snapshot made ahead of its commit.
pub(crate) struct Prepared {
    snap: String,
    old_head: String,
    new_head: String,
    file: File,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotInfo {
    pub name: String,
    pub parent: String,
    pub children: Vec<String>,
    pub created: String,
    /// Bytes allocated on disk by this layer.
    pub size: u64,
    pub user_created: bool,
    pub removed: bool,
    pub labels: HashMap<String, String>,
    /// Whether the volume currently reads through this layer.
    pub in_chain: bool,
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn layout_err(path: &Path, what: impl Into<String>) -> StoreError {
    StoreError::Layout { path: path.to_path_buf(), what: what.into() }
}

/// Deletes what an interrupted chain change left behind (see the module comment).
/// Only called once the chain itself has loaded and checked out.
pub(crate) fn remove_leftovers(dir: &Path, chain: &Chain) {
    let in_chain: Vec<&str> = chain.layers.iter().map(|l| l.name.as_str()).collect();
    let head = chain.head();
    let head_ino = std::fs::metadata(&head.path).map(|m| m.ino()).ok();
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    let metas: HashMap<String, DiskMeta> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".meta"))
        .filter(|img| img.ends_with(".img"))
        .filter_map(|img| DiskMeta::load(dir, img).ok().map(|m| (img.to_string(), m)))
        .collect();
    let is_parent = |img: &str| metas.values().any(|m| m.parent == img);
    let remove = |img: &str, why: &str| {
        warn!(dir = %dir.display(), file = img, "removing leftover of an interrupted change: {why}");
        let _ = std::fs::remove_file(dir.join(img));
        let _ = std::fs::remove_file(DiskMeta::path(dir, img));
    };
    for n in &names {
        if n.ends_with(".tmp") {
            let _ = std::fs::remove_file(dir.join(n));
            continue;
        }
        let img = n.strip_suffix(".meta").unwrap_or(n);
        if !img.ends_with(".img") || in_chain.contains(&img) || (n != img && names.iter().any(|x| x == img)) {
            continue;
        }
        if meta::head_number(img).is_some() {
            remove(img, "a head that is not the current head");
        } else if snap_name(img).is_some() {
            let path = dir.join(img);
            let exists = path.exists();
            let linked_to_head = exists && std::fs::metadata(&path).map(|m| Some(m.ino()) == head_ino).unwrap_or(false);
            let removed_orphan = metas.get(img).map(|m| m.removed).unwrap_or(false) && !is_parent(img);
            if !exists && n != img {
                remove(img, "snapshot meta without its file");
            } else if linked_to_head {
                remove(img, "snapshot name linked to the live head (rotation did not commit)");
            } else if removed_orphan {
                remove(img, "removed snapshot already merged into its child");
            }
        }
    }
    let _ = meta::sync_dir(dir);
}

/// Extents of a snapshot punched per hold of the chain's write lock (see
/// `punch_hidden`), and bytes (a longer extent is punched in pieces): I/O waits for one
/// batch, not for the whole snapshot.
const PUNCH_BATCH: usize = 64;
const PUNCH_BATCH_BYTES: u64 = 256 << 20;

impl Store {
    fn chain_mut(&self) -> std::sync::RwLockWriteGuard<'_, Chain> {
        self.chain.write().unwrap_or_else(|p| p.into_inner())
    }

    fn disk_metas(&self) -> Result<Vec<DiskMeta>, StoreError> {
        let dir = self.dir();
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| MetaError::io(dir, e))?.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(img) = n.strip_suffix(".meta") {
                if img.ends_with(".img") {
                    out.push(DiskMeta::load(dir, img)?);
                }
            }
        }
        Ok(out)
    }

    /// Every snapshot in the directory (on the chain or on a branch left by a revert),
    /// plus the head as `volume-head`, oldest first.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let _g = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let chain_names: Vec<String> = _g.layers.iter().map(|l| l.name.clone()).collect();
        let metas = self.disk_metas()?;
        let mut out: Vec<SnapshotInfo> = metas
            .iter()
            .map(|m| {
                let display = |f: &str| snap_name(f).map(|s| s.to_string()).unwrap_or_else(|| {
                    if meta::head_number(f).is_some() { "volume-head".to_string() } else { f.to_string() }
                });
                SnapshotInfo {
                    name: display(&m.name),
                    parent: if m.parent.is_empty() { String::new() } else { display(&m.parent) },
                    children: metas.iter().filter(|c| c.parent == m.name).map(|c| display(&c.name)).collect(),
                    created: m.created.clone(),
                    size: allocated_bytes(&self.dir().join(&m.name)),
                    user_created: m.user_created,
                    removed: m.removed,
                    labels: m.labels.clone().unwrap_or_default(),
                    in_chain: chain_names.contains(&m.name),
                }
            })
            .collect();
        out.sort_by(|a, b| {
            let pos = |s: &SnapshotInfo| chain_names.iter().position(|n| snap_name(n) == Some(&s.name) || (s.name == "volume-head" && meta::head_number(n).is_some()));
            (pos(a).is_none(), pos(a), a.created.clone(), a.name.clone()).cmp(&(pos(b).is_none(), pos(b), b.created.clone(), b.name.clone()))
        });
        Ok(out)
    }

    /// First half of a snapshot, done while I/O still runs: the new head file and both
    /// meta files. Nothing refers to them until the commit, so a crash leaves only
    /// leftovers that the next open removes.
    pub fn prepare_snapshot(
        &self,
        name: &str,
        user_created: bool,
        created: &str,
        labels: Option<HashMap<String, String>>,
    ) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        check_name(name).map_err(|e| layout_err(&dir, e))?;
        let snap = snap_file(name);
        if dir.join(&snap).exists() {
            return Err(layout_err(&dir.join(&snap), format!("snapshot {name:?} already exists")));
        }
        let mut prepared = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
        let (old_head, head_parent) = {
            let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
            if chain.layers.len() >= store::MAX_LAYERS {
                return Err(layout_err(
                    &dir,
                    format!(
                        "the chain has {} layers, the most a replica opens; remove snapshots before taking another",
                        chain.layers.len()
                    ),
                ));
            }
            let h = chain.head().name.clone();
            let parent = DiskMeta::load(&dir, &h)?.parent;
            (h, parent)
        };
        if DiskMeta::path(&dir, &snap).exists() && prepared.as_ref().map(|p| p.snap != snap).unwrap_or(true) {
            return Err(layout_err(&dir.join(&snap), format!("snapshot {name:?} already exists")));
        }
        let n = meta::head_number(&old_head).ok_or_else(|| layout_err(&dir.join(&old_head), "head has no number"))?;
        let new_head = meta::head_name(n + 1);
        // A head file from an earlier prepare that never committed is not in use.
        let _ = std::fs::remove_file(dir.join(&new_head));
        let f = new_head_file(&dir, &new_head, &snap, self.size(), created)?;
        fault("snapshot:new-head");
        // As Longhorn: the snapshot's meta is the head's, so its Name stays the head's.
        DiskMeta {
            name: snap.clone(),
            recorded_name: old_head.clone(),
            parent: head_parent,
            removed: false,
            user_created,
            created: created.to_string(),
            labels,
        }
        .store(&dir)?;
        fault("snapshot:snap-meta");
        *prepared = Some(Prepared { snap, old_head, new_head, file: f });
        Ok(())
    }

    /// Rotates the head into snapshot `name` (preparing first if that was not done).
    /// The caller (the engine) has stopped I/O; this part is three syncs long.
    pub fn snapshot(
        &self,
        name: &str,
        user_created: bool,
        created: &str,
        labels: Option<HashMap<String, String>>,
    ) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        let snap = snap_file(name);
        let ready = {
            let p = self.prepared.lock().unwrap_or_else(|p| p.into_inner());
            let head = self.chain.read().unwrap_or_else(|p| p.into_inner()).head().name.clone();
            p.as_ref().map(|p| p.snap == snap && p.old_head == head).unwrap_or(false)
        };
        if !ready {
            self.prepare_snapshot(name, user_created, created, labels)?;
        }
        let Some(Prepared { snap, old_head, new_head, file: f }) = self.prepared.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(layout_err(&dir, "snapshot was not prepared"));
        };
        let new_head_path = dir.join(&new_head);
        // The write lock on the chain holds off all I/O (and partial-block writes).
        let mut chain = self.chain_mut();
        let mut vm = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let old_head_path = chain.head().path.clone();
        if chain.head().name != old_head {
            return Err(layout_err(&old_head_path, "the head changed since the snapshot was prepared"));
        }
        let t0 = std::time::Instant::now();
        // No sync here: the engine flushed just before the pause, and what was written
        // since is synced by the next FLUSH (the old head joins the files it syncs). A
        // sync inside the pause costs tens of milliseconds of stalled I/O under load.
        self.defer_sync(&chain.head().file).map_err(|e| StoreError::Io { path: old_head_path.clone(), offset: 0, source: e })?;
        fault("snapshot:synced");
        std::fs::hard_link(&old_head_path, dir.join(&snap)).map_err(|e| MetaError::io(&dir.join(&snap), e))?;
        fault("snapshot:linked");
        let mut next = vm.clone();
        next.head = new_head.clone();
        next.parent = snap.clone();
        // Its directory sync also makes the link durable, and before the commit.
        next.store(&dir)?;
        *vm = next;
        fault("snapshot:committed");
        let _ = std::fs::remove_file(&old_head_path);
        let _ = std::fs::remove_file(DiskMeta::path(&dir, &old_head));
        fault("snapshot:cleaned");

        // The old head's open file is now the snapshot layer.
        let last = chain.layers.len() - 1;
        chain.layers[last].name = snap.clone();
        chain.layers[last].path = dir.join(&snap);
        chain.layers.push(store::Layer { name: new_head.clone(), path: new_head_path, file: std::sync::Arc::new(f) });
        let mut maps = chain.maps_mut();
        maps.below = maps.top.clone();
        drop(maps);
        info!(dir = %dir.display(), snapshot = name, head = %new_head, commit_us = t0.elapsed().as_micros() as u64, "snapshot taken");
        Ok(())
    }

    /// Removes snapshot `name`: merged into its child when that is a snapshot, or
    /// kept as a Removed layer with the blocks the head hides punched out when its
    /// child is the head. Returns what was done, for the log and the CLI.
    pub fn remove_snapshot(&self, name: &str) -> Result<String, StoreError> {
        let dir = self.dir().to_path_buf();
        if name == "volume-head" || meta::head_number(name).is_some() {
            return Err(layout_err(&dir, "the volume head cannot be removed"));
        }
        check_name(name).map_err(|e| layout_err(&dir, e))?;
        let snap = snap_file(name);
        let metas = self.disk_metas()?;
        let Some(sm) = metas.iter().find(|m| m.name == snap).cloned() else {
            return Err(layout_err(&dir.join(&snap), format!("no snapshot named {name:?}")));
        };
        let children: Vec<DiskMeta> = metas.iter().filter(|m| m.parent == snap).cloned().collect();
        let mark_removed = |m: &DiskMeta| -> Result<(), StoreError> {
            if !m.removed {
                let mut r = m.clone();
                r.removed = true;
                r.store(&dir)?;
            }
            Ok(())
        };
        match children.as_slice() {
            [] => {
                // A leaf on a branch the chain no longer reads: nothing needs it.
                let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
                if chain.layers.iter().any(|l| l.name == snap) {
                    return Err(layout_err(&dir.join(&snap), "snapshot is in the chain but has no child"));
                }
                drop(chain);
                mark_removed(&sm)?;
                std::fs::remove_file(dir.join(&snap)).map_err(|e| MetaError::io(&dir.join(&snap), e))?;
                let _ = std::fs::remove_file(DiskMeta::path(&dir, &snap));
                meta::sync_dir(&dir)?;
                Ok(format!("deleted {name} (no child needed it)"))
            }
            [c] if meta::head_number(&c.name).is_some() => {
                mark_removed(&sm)?;
                fault("remove:marked");
                let freed = self.punch_hidden(&snap)?;
                Ok(format!("marked {name} removed; the head is its child, so it stays in the chain; {freed} bytes its data hid returned"))
            }
            [c] => {
                mark_removed(&sm)?;
                fault("remove:marked");
                self.merge_into_child(&sm, c)?;
                Ok(format!("merged {name} into {}", snap_name(&c.name).unwrap_or(&c.name)))
            }
            _ => {
                mark_removed(&sm)?;
                Ok(format!("marked {name} removed; it has {} children, so its data stays", children.len()))
            }
        }
    }

    /// Punches out of snapshot `snap` every block the head covers.
    fn punch_hidden(&self, snap: &str) -> Result<u64, StoreError> {
        let (covered, path, file) = {
            let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
            let Some(si) = chain.layers.iter().position(|l| l.name == snap) else { return Ok(0) };
            let head_idx = chain.head_index();
            let covered: Vec<(u64, u64)> = {
                let maps = chain.maps.read().unwrap_or_else(|p| p.into_inner());
                maps.top.iter().filter(|&(_, _, l)| l == head_idx).map(|(s, e, _)| (s, e)).collect()
            };
            // The head's copy of those blocks must be on disk before the snapshot's goes:
            // a power loss would otherwise turn them back into holes over a punched
            // snapshot, and reads would fall through to older data.
            let head = chain.head();
            head.file.sync_data().map_err(|e| StoreError::Io { path: head.path.clone(), offset: 0, source: e })?;
            fault("remove:head-synced");
            (covered, chain.layers[si].path.clone(), chain.layers[si].file.clone())
        };
        let before = allocated_bytes(&path);
        // Punched under the chain's write lock, a batch at a time: a read holds the read
        // lock from finding a block's layer to reading it, and a block found in the
        // snapshot just before a write covered it in the head must not be read after
        // it became a hole (a sector the write did not touch would read as zeros). Reads
        // the kernel finishes later (`uring`) see `punched` move and are read again.
        let mut pieces = covered.iter().flat_map(|&(s, e)| {
            let (a, b) = (s.div_ceil(BLOCK) * BLOCK, e / BLOCK * BLOCK);
            (a..b).step_by(PUNCH_BATCH_BYTES as usize).map(move |x| (x, (x + PUNCH_BATCH_BYTES).min(b)))
        });
        let mut next = pieces.next();
        while next.is_some() {
            let _chain = self.chain_mut();
            self.punched.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let (mut n, mut bytes) = (0usize, 0u64);
            while let Some((a, b)) = next {
                if n == PUNCH_BATCH || (n > 0 && bytes + (b - a) > PUNCH_BATCH_BYTES) {
                    break;
                }
                punch_hole(&file, a, b - a).map_err(|e| StoreError::Io { path: path.clone(), offset: a, source: e })?;
                (n, bytes) = (n + 1, bytes + (b - a));
                next = pieces.next();
            }
        }
        file.sync_data().map_err(|e| StoreError::Io { path: path.clone(), offset: 0, source: e })?;
        fault("remove:punched");
        Ok(before.saturating_sub(allocated_bytes(&path)))
    }

    fn merge_into_child(&self, sm: &DiskMeta, cm: &DiskMeta) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        let size = self.size();
        let spath = dir.join(&sm.name);
        let cpath = dir.join(&cm.name);
        let sfile = File::open(&spath).map_err(|e| MetaError::io(&spath, e))?;
        let cfile = OpenOptions::new().read(true).write(true).open(&cpath).map_err(|e| MetaError::io(&cpath, e))?;
        let ioe = |p: &Path, off: u64, e: std::io::Error| StoreError::Io { path: p.to_path_buf(), offset: off, source: e };
        let s_data = store::allocated_ranges(&sfile, size).map_err(|e| ioe(&spath, 0, e))?;
        let mut c_map = crate::extent::ExtentMap::new();
        for (a, b) in store::allocated_ranges(&cfile, size).map_err(|e| ioe(&cpath, 0, e))? {
            c_map.insert(a, b, 0);
        }
        let mut buf = vec![0u8; 1 << 20];
        for (a, b) in s_data {
            for seg in c_map.lookup(a, b) {
                if seg.layer.is_some() {
                    continue;
                }
                let mut pos = seg.start;
                while pos < seg.end {
                    let n = ((seg.end - pos) as usize).min(buf.len());
                    sfile.read_exact_at(&mut buf[..n], pos).map_err(|e| ioe(&spath, pos, e))?;
                    cfile.write_all_at(&buf[..n], pos).map_err(|e| ioe(&cpath, pos, e))?;
                    pos += n as u64;
                }
            }
        }
        fault("remove:copied");
        cfile.sync_data().map_err(|e| ioe(&cpath, 0, e))?;
        let mut c2 = cm.clone();
        c2.parent = sm.parent.clone();
        // Only the commit and the in-memory swap need I/O held off.
        let mut chain = self.chain_mut();
        c2.store(&dir)?;
        fault("remove:committed");
        if let Some(si) = chain.layers.iter().position(|l| l.name == sm.name) {
            chain.layers.remove(si);
            let si = si as u16;
            let mut maps = chain.maps_mut();
            let remap = |m: &crate::extent::ExtentMap| {
                let mut n = crate::extent::ExtentMap::new();
                for (a, b, l) in m.iter() {
                    // S's ranges now live in C, which takes S's index once S is gone.
                    n.insert(a, b, if l > si { l - 1 } else { l });
                }
                n
            };
            maps.top = remap(&maps.top);
            maps.below = remap(&maps.below);
        }
        drop(chain);
        let _ = std::fs::remove_file(&spath);
        let _ = std::fs::remove_file(DiskMeta::path(&dir, &sm.name));
        meta::sync_dir(&dir)?;
        fault("remove:cleaned");
        Ok(())
    }

    /// Makes the volume read as snapshot `name` did: a new empty head on top of it.
    /// The caller has stopped I/O.
    pub fn revert(&self, name: &str, created: &str) -> Result<(), StoreError> {
        let dir = self.dir().to_path_buf();
        check_name(name).map_err(|e| layout_err(&dir, e))?;
        let snap = snap_file(name);
        let sm = DiskMeta::load(&dir, &snap).map_err(|_| layout_err(&dir.join(&snap), format!("no snapshot named {name:?}")))?;
        if sm.removed {
            return Err(layout_err(&dir.join(&snap), format!("snapshot {name:?} was removed; it cannot be reverted to")));
        }
        let mut chain = self.chain_mut();
        let mut vm = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let old_head = chain.head().name.clone();
        let n = meta::head_number(&old_head).ok_or_else(|| layout_err(&dir, "head has no number"))?;
        let new_head = meta::head_name(n + 1);
        drop(new_head_file(&dir, &new_head, &snap, self.size(), created)?);
        fault("revert:new-head");
        let mut next: VolumeMeta = vm.clone();
        next.head = new_head.clone();
        next.parent = snap.clone();
        let loaded = store::load_chain(&dir, &next)?;
        next.store(&dir)?;
        *vm = next;
        fault("revert:committed");
        *chain = loaded;
        let _ = std::fs::remove_file(dir.join(&old_head));
        let _ = std::fs::remove_file(DiskMeta::path(&dir, &old_head));
        meta::sync_dir(&dir)?;
        info!(dir = %dir.display(), snapshot = name, head = %new_head, "reverted");
        Ok(())
    }

    /// Whether the head holds any data (a recurring snapshot of an idle volume is skipped).
    pub fn head_has_data(&self) -> bool {
        let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
        let h = chain.head_index();
        let maps = chain.maps.read().unwrap_or_else(|p| p.into_inner());
        let r = maps.top.iter().any(|(_, _, l)| l == h);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read planned for the kernel (`uring`) before a write covered its block in the
    /// head and the snapshot under it was removed (its hidden blocks punched) would read
    /// the punched hole: the plan is known stale and is read again, and a blocking read
    /// sees the block's untouched sectors as they were.
    #[test]
    fn a_read_planned_before_a_punch_is_known_stale() {
        let tmp = std::env::temp_dir().join(format!("lh-punch-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        Store::create(&tmp, "v", 1 << 20).expect("create");
        let s = Store::open(&tmp, Some("v")).expect("open");
        let old: Vec<u8> = (0..BLOCK as usize).map(|i| (i % 251) as u8 + 1).collect();
        s.write(0, &old).expect("write");
        s.snapshot("s1", true, "2026-12-08T00:00:00Z", None).expect("snapshot");
        // Sector 1 of block 0, found in the snapshot.
        let mut dst = vec![0u8; 512];
        let mut pieces = Vec::new();
        // SAFETY: dst is valid for 512 bytes and outlives the pieces.
        let planned = unsafe { s.plan_read(512, dst.as_mut_ptr(), 512, &mut pieces) }.expect("plan");
        assert_eq!(pieces.len(), 1);
        assert!(!s.punched_since(planned));
        // Another connection writes sector 0: the head now covers the whole block.
        s.write(0, &[0xEE; 512]).expect("sector write");
        let done = s.remove_snapshot("s1").expect("remove");
        assert!(done.contains("marked s1 removed"), "{done}");
        // The kernel's read of the plan now finds the punched hole.
        let p = &pieces[0];
        let n = p.file.read_at(&mut dst, p.at).expect("pread");
        assert_eq!(n, 512);
        assert_eq!(dst, vec![0u8; 512], "the snapshot's block was punched");
        assert!(s.punched_since(planned), "a plan made before the punch must be read again");
        let mut b = bytes::BytesMut::new();
        s.read_into(512, 512, &mut b).expect("read");
        assert_eq!(&b[..], &old[512..1024], "an untouched sector keeps its data");
        drop(pieces);
        drop(s);
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
