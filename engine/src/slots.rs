//! A fixed set of slots filled once each, readable without locks: the replica set
//! and each session's replica connections grow while I/O runs (a replica added for
//! rebuild) and never shrink (a dropped replica keeps its slot, in mode ERR).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// At most this many replicas over an engine's life: request masks are `u32`.
pub const MAX_SLOTS: usize = 32;

pub struct Slots<T> {
    slots: Vec<OnceLock<T>>,
    len: AtomicUsize,
    grow: Mutex<()>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots { slots: (0..MAX_SLOTS).map(|_| OnceLock::new()).collect(), len: AtomicUsize::new(0), grow: Mutex::new(()) }
    }
}

impl<T> Slots<T> {
    /// Slots in use, set or not: indices below this may be filled.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.slots.get(i).and_then(|s| s.get())
    }

    /// Appends `v`; returns its index, or gives `v` back when all slots are used.
    pub fn push(&self, v: T) -> Result<usize, T> {
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let i = self.len();
        let Some(slot) = self.slots.get(i) else { return Err(v) };
        slot.set(v)?;
        self.len.store(i + 1, Ordering::Release);
        Ok(i)
    }

    /// Fills slot `i` (for a session following the replica set's indices).
    pub fn set(&self, i: usize, v: T) -> Result<(), T> {
        let _g = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = self.slots.get(i) else { return Err(v) };
        slot.set(v)?;
        if i >= self.len() {
            self.len.store(i + 1, Ordering::Release);
        }
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        (0..self.len()).filter_map(move |i| self.get(i).map(|v| (i, v)))
    }
}
