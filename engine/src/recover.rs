//! Bringing replicas back without an operator, on a control thread beside the I/O path.
//!
//! - **Salvage** (`VolumeOptions::auto_salvage`): when no replica is RW (every one failed:
//!   say the engine was cut off from all of them), the failed replicas that answer
//!   again are asked for their state, and those holding the newest data (the highest
//!   revision counter, not half-rebuilt) are taken back RW together, as at engine
//!   start. They get fresh slots, attached to every session while still ERR, and turn
//!   RW in one I/O pause, so no write can reach one of them and not the others. A
//!   write that failed with EIO while the volume was faulted may have reached some of
//!   them and not others, at equal revision counters: unless they are all settled
//!   (`ReplicaInfo::unsettled`), one is taken back and the rest are rebuilt from it,
//!   as at engine start.
//! - **Re-add** (`VolumeOptions::auto_rebuild`): a failed replica that answers again is
//!   added back and rebuilt from a healthy one (incrementally: it keeps its files),
//!   tries backing off from 1 s to 60 s; the backoff is forgotten once the replica has
//!   stayed RW for a minute. A replica the operator removed stays out. For a host's
//!   supervisor that restarts replica processes itself (`longhorn up`), this is off.

use crate::volume::{Mode, ReplicaState, Volume};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{info, warn};

const TICK: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const SETTLED: Duration = Duration::from_secs(60);

struct Tries {
    next: Instant,
    delay: Duration,
    rw_since: Option<Instant>,
}

/// The recovery thread of a volume; ends with it.
pub(crate) fn run(v: Weak<Volume>) {
    let mut tries: HashMap<String, Tries> = HashMap::new();
    loop {
        std::thread::sleep(TICK);
        let Some(v) = v.upgrade() else { return };
        if v.options().auto_salvage && v.healthy() == 0 {
            match v.salvage() {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::debug!(volume = v.name(), "salvage: {e}"),
            }
        }
        if v.options().auto_rebuild && v.healthy() > 0 {
            readd(&v, &mut tries);
        }
    }
}

/// The newest slot of each address, unless the operator removed it.
fn latest_slots(v: &Volume) -> Vec<(usize, Arc<ReplicaState>)> {
    let mut latest: HashMap<String, (usize, Arc<ReplicaState>)> = HashMap::new();
    for (i, r) in v.replicas.iter() {
        latest.insert(r.addr.clone(), (i, r.clone()));
    }
    let mut out: Vec<(usize, Arc<ReplicaState>)> = latest.into_values().filter(|(_, r)| !r.removed()).collect();
    out.sort_by_key(|(i, _)| *i);
    out
}

fn readd(v: &Arc<Volume>, tries: &mut HashMap<String, Tries>) {
    let now = Instant::now();
    for (_, r) in latest_slots(v) {
        let t = tries.entry(r.addr.clone()).or_insert(Tries { next: now, delay: FIRST_BACKOFF, rw_since: None });
        match r.mode() {
            Mode::RW => {
                let since = *t.rw_since.get_or_insert(now);
                if now.duration_since(since) >= SETTLED {
                    tries.remove(&r.addr);
                }
                continue;
            }
            Mode::WO => continue,
            Mode::ERR => t.rw_since = None,
        }
        if now < t.next {
            continue;
        }
        t.next = now + t.delay;
        t.delay = (t.delay * 2).min(MAX_BACKOFF);
        // Only a replica that answers is worth a rebuild attempt.
        if let Err(e) = v.dialer().connect(&r.addr) {
            tracing::debug!(replica = %r.addr, "not back yet: {e}");
            continue;
        }
        info!(volume = v.name(), replica = %r.addr, "a failed replica answers again; adding it back");
        match v.add_replica(&r.addr) {
            Ok(m) => info!(volume = v.name(), "{m}"),
            Err(e) => warn!(volume = v.name(), replica = %r.addr, "adding the replica back failed: {e}"),
        }
    }
}

impl Volume {
    /// Takes back RW the replicas with the newest data when none is RW (see the module
    /// comment). Returns how many.
    pub(crate) fn salvage(self: &Arc<Self>) -> Result<usize, String> {
        let _ctl = self.control_guard()?;
        if self.healthy() > 0 {
            return Ok(0);
        }
        let mut answers = Vec::new();
        for (_, r) in latest_slots(self) {
            match self.dialer().connect(&r.addr) {
                Ok((_, info)) if !info.rebuilding => answers.push((r.addr.clone(), info)),
                Ok(_) => tracing::debug!(replica = %r.addr, "half-rebuilt; not salvaged"),
                Err(e) => tracing::debug!(replica = %r.addr, "still unreachable: {e}"),
            }
        }
        // Only once the replica that was RW last answers: one dropped before it lacks
        // the writes acknowledged after its drop, and taking it back (then rebuilding
        // the others from it) would lose them.
        let last = self.at_fault.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(last) = &last {
            if !answers.iter().any(|(a, _)| a == last) {
                return Err(format!("waiting for {last}, the replica that was RW last; the others may lack acknowledged writes"));
            }
        }
        let Some(newest) = answers.iter().map(|(_, i)| i.revision).max() else {
            return Err("no failed replica answers yet".into());
        };
        // As at engine start: the newest data, in the chain most of those replicas hold.
        let infos: Vec<&longhorn_replica::proto::ReplicaInfo> = answers.iter().map(|(_, i)| i).collect();
        let chain = crate::volume::trusted_chain(&infos, newest);
        let candidates: Vec<(&str, &longhorn_replica::proto::ReplicaInfo)> = answers
            .iter()
            .filter(|(_, i)| i.revision == newest && crate::volume::snapshot_chain(i) == chain)
            .map(|(a, i)| (a.as_str(), i))
            .collect();
        // Writes that failed with EIO may have reached them in different subsets.
        let keep = crate::volume::settled_pick(&candidates);
        let chosen: Vec<(String, u64)> = candidates
            .iter()
            .filter(|(a, _)| keep.is_none_or(|k| k == *a))
            .map(|(a, i)| (a.to_string(), i.revision))
            .collect();
        // No session may open between the slots' attaching and their turning RW: it
        // would skip them (ERR when it looked) and its writes would miss a replica that
        // serves reads.
        let _members = self.membership.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots = Vec::new();
        for (addr, rev) in chosen.iter() {
            for (_, r) in self.replicas.iter() {
                if &r.addr == addr {
                    r.set_removed();
                }
            }
            let i = self
                .replicas
                .push(Arc::new(ReplicaState::new(addr, Mode::ERR, "being salvaged".into())))
                .map_err(|_| "this engine has used all its replica slots; restart it".to_string())?;
            let attached = self.live_sessions().iter().all(|s| s.attach(i).is_ok());
            if attached {
                slots.push((i, addr.clone(), *rev));
            } else {
                warn!(volume = self.name(), replica = %addr, "cannot attach a salvaged replica to every session; left out");
            }
        }
        if slots.is_empty() {
            return Err("no salvaged replica could be attached".into());
        }
        self.pause(Duration::from_secs(30)).map_err(|e| format!("salvage: {e}"))?;
        for (i, _, _) in &slots {
            if let Some(r) = self.replicas.get(*i) {
                r.set_mode(Mode::RW);
            }
        }
        *self.at_fault.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.resume();
        let names: Vec<String> = slots.iter().map(|(_, a, _)| a.clone()).collect();
        warn!(volume = self.name(), replicas = %names.join(" "), revision = newest, "volume salvaged: the replicas with the newest data are RW again");
        Ok(slots.len())
    }
}
