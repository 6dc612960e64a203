//! Growing a replica directory that no process serves (the volume's offline expand).
//!
//! The order, and the rule that makes it crash-safe:
//! 1. `volume.meta` gets the new `Size` and `ExpandingFrom` = the old size, in one
//!    atomic write: the commit point.
//! 2. Every layer file of the directory grows sparsely to the new size and is synced:
//!    the chain's, and snapshots a revert left off the chain (a later revert may bring
//!    them back, and a chain must have files of one size).
//! 3. `volume.meta` drops `ExpandingFrom`.
//!
//! A crash before 1 leaves the old size. After it the volume has the new size: the
//! next `Store::open` (or `expand` again) grows every layer file still at exactly
//! `ExpandingFrom` and so finishes 2 and 3. A file of any other length than `Size` is
//! still refused: that is damage, not an interrupted expansion.
//!
//! The grown range is a hole in every layer, so it reads as zeros, which is right:
//! nothing was ever written there. The revision counter, the Dirty flag and the chain
//! are left as they are, so the replicas of a volume stay comparable.

use crate::fault;
use crate::meta::{self, MetaError, VolumeMeta};
use crate::store::{self, StoreError, BLOCK};
use std::fs::{File, OpenOptions};
use std::path::Path;
use tracing::{info, warn};

/// Grows the replica in `dir` to `new_size` bytes; returns the size it had. The same
/// size again is a no-op (so a caller may retry after a crash); a smaller one is
/// refused. Refused too while a replica process serves the directory (its lock).
pub fn expand(dir: &Path, new_size: u64) -> Result<u64, StoreError> {
    let _lock = store::lock_dir(dir)?;
    let mut vm = VolumeMeta::load(dir)?;
    let vm_path = dir.join(meta::VOLUME_META);
    // Reads and checks the chain (lengths included) before anything is written.
    store::load_chain(dir, &vm)?;
    if vm.expanding_from != 0 {
        info!(dir = %dir.display(), from = vm.expanding_from, to = vm.size, "finishing an interrupted expansion");
        grow_layers(dir, &vm)?;
        vm.expanding_from = 0;
        vm.store(dir)?;
    }
    let old = vm.size;
    // off_t is signed: a size past i64::MAX would wrap in set_len.
    if new_size == 0 || new_size % BLOCK != 0 || new_size % vm.sector_size != 0 || new_size > i64::MAX as u64 {
        return Err(StoreError::Layout {
            path: vm_path,
            what: format!("new size {new_size} must be a non-zero multiple of {BLOCK} and of SectorSize {}", vm.sector_size),
        });
    }
    if new_size < old {
        return Err(StoreError::Shrink { path: vm_path, size: old, requested: new_size });
    }
    if new_size == old {
        return Ok(old);
    }
    probe(dir, new_size)?;
    vm.size = new_size;
    vm.expanding_from = old;
    vm.store(dir)?;
    fault::point("expand:committed");
    grow_layers(dir, &vm)?;
    fault::point("expand:grown");
    vm.expanding_from = 0;
    vm.store(dir)?;
    info!(dir = %dir.display(), from = old, to = new_size, "replica expanded");
    Ok(old)
}

/// Asks the filesystem for a sparse file of `size` bytes before anything is committed:
/// ext4 holds at most 16 TiB - 4 KiB in a file, less than a volume may be, and a refusal
/// after the commit would leave a volume.meta that no file can be grown to match. The
/// manager asks the same before it accepts a volume, so a size its disk cannot hold is
/// refused at create, not at the first attach. `TooLarge` is the filesystem's refusal.
pub fn probe(dir: &Path, size: u64) -> Result<(), StoreError> {
    let path = dir.join("expand-probe.tmp");
    let r = File::create(&path).and_then(|f| f.set_len(size));
    // A leftover is harmless: open removes *.tmp files.
    let _ = std::fs::remove_file(&path);
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)) => {
            Err(StoreError::TooLarge { path: dir.to_path_buf(), requested: size, source: e })
        }
        Err(e) => Err(MetaError::io(&path, e).into()),
        Ok(()) => Ok(()),
    }
}

/// Step 2: every layer file at exactly `ExpandingFrom` bytes grows to `Size`. A file
/// off the chain with another length is left alone (it is never opened as it is; the
/// chain's files were checked by the caller).
pub(crate) fn grow_layers(dir: &Path, vm: &VolumeMeta) -> Result<(), StoreError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| MetaError::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| meta::check_layer_name(n).is_ok())
        .collect();
    names.sort();
    let mut grown = 0;
    for name in &names {
        let path = dir.join(name);
        let f = OpenOptions::new().write(true).open(&path).map_err(|e| MetaError::io(&path, e))?;
        let len = f.metadata().map_err(|e| MetaError::io(&path, e))?.len();
        if len == vm.size {
            continue;
        }
        if len != vm.expanding_from {
            warn!(file = %path.display(), len, size = vm.size, "not grown: neither the old nor the new size of the volume");
            continue;
        }
        f.set_len(vm.size).map_err(|e| MetaError::io(&path, e))?;
        // The length is metadata: sync_all, not sync_data.
        f.sync_all().map_err(|e| MetaError::io(&path, e))?;
        grown += 1;
        if grown == 1 {
            fault::point("expand:grew-one");
        }
    }
    Ok(())
}
