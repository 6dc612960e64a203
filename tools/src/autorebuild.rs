//! Automatic rebuild for `longhorn up`: the volume manager watches its replicas and
//! brings a failed one back without the operator.
//!
//! A replica counts as failed when its process has exited, or when the engine lists it
//! as ERR (an I/O error, a hang past the I/O timeout, a failed rebuild). The manager
//! then kills the process if it still runs, starts a new one on the same directory
//! (new port) and adds it to the engine, which rebuilds it online; a returning replica
//! is sent only the ranges that differ. A replica the operator removed (`replica rm`)
//! is stopped and no longer managed.
//!
//! Tries are spaced by a backoff (1 s doubling to 60 s). When a replica has been failed
//! for longer than `staleReplicaTimeout` its directory is stale: it is deleted and the
//! replica is built afresh from a healthy one (a full rebuild). That is done only while
//! the engine has a healthy (RW) replica to copy from.

use crate::up::{spawn_and_wait, Proc};
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A replica must stay RW this long before its backoff starts over: a replica that
/// fails again right after each rebuild is retried ever more slowly (each add also
/// takes one of the engine's replica slots for the engine's life).
const STABLE: Duration = Duration::from_secs(60);
/// How often the engine is asked for its replicas' modes.
const POLL: Duration = Duration::from_secs(2);

pub struct Replica {
    pub name: String,
    pub dir: PathBuf,
    pub addr: String,
    pub proc: Option<Proc>,
    failed_since: Option<Instant>,
    healthy_since: Option<Instant>,
    next_try: Instant,
    backoff: Duration,
    /// Removed by the operator: left alone.
    retired: bool,
    /// Run by another host's manager on a fixed address: never started or stopped
    /// here; a failed one is taken out and added back, which rebuilds it.
    remote: bool,
    /// Taken out of the engine here to be added back: missing from its list is then
    /// no sign that someone removed it.
    readding: bool,
}

impl Replica {
    pub fn new(name: String, dir: PathBuf, addr: String, proc: Proc) -> Replica {
        Replica {
            name,
            dir,
            addr,
            proc: Some(proc),
            failed_since: None,
            healthy_since: None,
            next_try: Instant::now(),
            backoff: FIRST_BACKOFF,
            retired: false,
            remote: false,
            readding: false,
        }
    }

    pub fn remote(addr: String) -> Replica {
        Replica {
            name: format!("remote replica {addr}"),
            dir: PathBuf::new(),
            addr,
            proc: None,
            failed_since: None,
            healthy_since: None,
            next_try: Instant::now(),
            backoff: FIRST_BACKOFF,
            retired: false,
            remote: true,
            readding: false,
        }
    }

    pub fn stop(&mut self, wait: Duration) {
        if let Some(p) = self.proc.as_mut() {
            if p.stop(wait) {
                self.proc = None;
            }
        }
    }

    fn exited(&mut self) -> Option<String> {
        if self.remote {
            return None;
        }
        match self.proc.as_mut().map(|p| p.child.try_wait()) {
            None => Some("not running".into()),
            Some(Ok(Some(st))) => Some(format!("its process exited ({st})")),
            _ => None,
        }
    }
}

/// What a replica manager needs to start and add replicas.
pub struct Ctx<'a> {
    pub exe: &'a Path,
    pub run_dir: &'a Path,
    pub volume: &'a str,
    pub size: u64,
    pub log_dir: &'a Path,
    /// `None`: never declare a replica stale.
    pub stale_after: Option<Duration>,
    /// The volume's secret file, given to every replica and the engine.
    pub secret: &'a Path,
    /// Addresses of remote replicas the volume's manager replaced (one a line): no
    /// longer added back here.
    pub retired: &'a Path,
}

#[derive(Default)]
pub struct Supervisor {
    last_poll: Option<Instant>,
    /// Addresses to take out of the engine's list (old incarnations of replicas, adds
    /// that failed halfway); retried until the engine has let go of them.
    to_remove: Vec<String>,
    /// Said once that nothing can be rebuilt while no replica is healthy.
    said_faulted: bool,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// One round: looks at every replica and acts on the failed ones whose turn it is.
    pub fn tick(&mut self, cx: &Ctx, replicas: &mut Vec<Replica>) {
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL) {
            return;
        }
        self.last_poll = Some(Instant::now());
        self.to_remove.retain(|addr| match crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-rm", "address": addr})) {
            Ok(_) => false,
            Err(e) => !e.contains("no replica"),
        });
        // The engine's own view, without probing the replicas: a probe that times out
        // would fail a replica that is merely slow.
        let ls = match crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-modes"})) {
            Ok(v) => v,
            // The engine is busy or stopping; `up` watches the engine itself.
            Err(_) => return,
        };
        let list = ls.as_array().cloned().unwrap_or_default();
        let healthy = list.iter().filter(|r| r["mode"] == "RW").count();
        if healthy == 0 && !self.said_faulted {
            eprintln!("longhorn up: volume {} has no healthy replica; nothing can be rebuilt from (faulted)", cx.volume);
        }
        self.said_faulted = healthy == 0;
        if let Ok(text) = std::fs::read_to_string(cx.retired) {
            for r in replicas.iter_mut().filter(|r| r.remote && !r.retired) {
                if text.lines().any(|l| l.trim() == r.addr) {
                    eprintln!("longhorn up: {} was replaced by the volume's manager; no longer added back", r.name);
                    r.retired = true;
                }
            }
        }
        // A replica someone else added to the engine (the controller moving a lost
        // host's replica to another host, or `replica add`) is kept like a remote one.
        for e in &list {
            let Some(addr) = e["address"].as_str() else { continue };
            if !replicas.iter().any(|r| r.addr == addr) && !self.to_remove.iter().any(|a| a == addr) {
                eprintln!("longhorn up: {addr} joined the volume; watching it");
                replicas.push(Replica::remote(addr.to_string()));
            }
        }
        for k in 0..replicas.len() {
            let r = &mut replicas[k];
            if r.retired {
                continue;
            }
            // An empty address: this manager took the replica out and has not put it back yet.
            let entry = list.iter().find(|e| !r.addr.is_empty() && e["address"] == r.addr.as_str());
            // A remote replica out of the list that was taken out here is added back;
            // one someone else removed is theirs to place.
            if entry.is_none() && !r.readding && !r.addr.is_empty() && !self.to_remove.contains(&r.addr) {
                eprintln!("longhorn up: {} ({}) was removed from the volume; stopping it, no longer rebuilt", r.name, r.addr);
                // A remote one is its host's to stop.
                r.stop(Duration::from_secs(10));
                r.retired = true;
                continue;
            }
            let why = match (r.exited(), entry) {
                (Some(why), _) => why,
                (None, Some(e)) => match e["mode"].as_str() {
                    Some("RW") => {
                        if r.failed_since.take().is_some() {
                            eprintln!("longhorn up: {} ({}) is rebuilt and healthy (RW)", r.name, r.addr);
                        }
                        let since = *r.healthy_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= STABLE {
                            r.backoff = FIRST_BACKOFF;
                        }
                        continue;
                    }
                    // Rebuilding: the engine finishes it or marks it ERR.
                    Some("WO") => continue,
                    _ => format!("the engine marked it ERR: {}", e["error"].as_str().unwrap_or("")),
                },
                (None, None) => "not in the volume".into(),
            };
            r.healthy_since = None;
            let since = *r.failed_since.get_or_insert_with(|| {
                eprintln!("longhorn up: {} ({}) failed: {why}; rebuilding it", r.name, r.addr);
                Instant::now()
            });
            if Instant::now() < r.next_try {
                continue;
            }
            if healthy == 0 {
                // Nothing to rebuild from; the engine has failed its I/O already.
                continue;
            }
            if r.remote {
                // Its host's manager restarts the process on the same address; the
                // controller that placed it moves it to another host when it is stale.
                r.readding = true;
                match readd(cx, r) {
                    Ok(()) => {
                        r.readding = false;
                        eprintln!("longhorn up: {} added back; rebuilding", r.name)
                    }
                    Err(e) => eprintln!("longhorn up: {}: not back yet: {e:#}; next try in {:?}", r.name, r.backoff),
                }
                r.next_try = Instant::now() + r.backoff;
                r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            let stale = cx.stale_after.is_some_and(|t| since.elapsed() >= t);
            match replace(cx, r, stale, &mut self.to_remove) {
                Ok(()) => eprintln!("longhorn up: {} restarted at {}{}; rebuilding", r.name, r.addr, if stale { " from scratch (stale)" } else { "" }),
                Err(e) => eprintln!("longhorn up: {}: rebuild attempt failed: {e:#}; next try in {:?}", r.name, r.backoff),
            }
            r.next_try = Instant::now() + r.backoff;
            r.backoff = (r.backoff * 2).min(MAX_BACKOFF);
            // The new process may have been given the port of another replica's dead
            // process: that record's address is no longer its own.
            let addr = replicas[k].addr.clone();
            for (j, o) in replicas.iter_mut().enumerate() {
                if j != k && !addr.is_empty() && o.addr == addr {
                    o.addr.clear();
                }
            }
        }
    }
}

/// Stops `r`'s process, starts a new one on its directory (emptied first when `stale`)
/// and adds it to the engine. Addresses the engine must let go of go to `to_remove`.
fn replace(cx: &Ctx, r: &mut Replica, stale: bool, to_remove: &mut Vec<String>) -> Result<()> {
    if let Some(mut p) = r.proc.take() {
        // A hung replica ignores SIGTERM; `stop` kills it after the wait.
        if !p.stop(Duration::from_secs(3)) {
            r.proc = Some(p);
            bail!("its old process is still alive; no new one is started on {} until it is gone", r.dir.display());
        }
    }
    // The old address leaves the engine's list; the new one takes its place.
    if !r.addr.is_empty() {
        if crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-rm", "address": r.addr})).is_err() {
            to_remove.push(r.addr.clone());
        }
        r.addr.clear();
    }
    if stale && r.dir.exists() {
        eprintln!("longhorn up: {} has been failed longer than staleReplicaTimeout; deleting {}", r.name, r.dir.display());
        std::fs::remove_dir_all(&r.dir).map_err(|e| anyhow!("deleting the stale replica {}: {e}", r.dir.display()))?;
    }
    let (mut p, addr) = start_replica(cx, &r.name, &r.dir)?;
    if let Err(e) = crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-add", "address": addr})) {
        p.stop(Duration::from_secs(3));
        // The engine may have taken it in before the failure.
        to_remove.push(addr.clone());
        bail!("adding {addr} to the engine: {e}");
    }
    r.proc = Some(p);
    r.addr = addr;
    Ok(())
}

/// Takes a failed remote replica out of the engine (if still listed) and adds it back,
/// which rebuilds it from a healthy one (only what differs, as its files are kept).
fn readd(cx: &Ctx, r: &Replica) -> Result<()> {
    if let Err(e) = crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-rm", "address": r.addr})) {
        if !e.contains("no replica") {
            bail!("taking {} out of the engine: {e}", r.addr);
        }
    }
    crate::control_call(cx.run_dir, cx.volume, &json!({"cmd": "replica-add", "address": r.addr})).map_err(|e| anyhow!("adding {}: {e}", r.addr))?;
    Ok(())
}

/// Starts `longhorn replica serve` on `dir`, on a free loopback port. Not on a unix
/// socket, though the engine is on this host: with three replicas on unix sockets, 4k
/// random reads over two NBD connections (the kernel NBD frontend makes 2-4) ran at
/// 52k-78k IOPS against TCP's 108k-152k, while 1 MiB writes and flushes gained
/// 15-25% (README, "Transports").
pub fn start_replica(cx: &Ctx, name: &str, dir: &Path) -> Result<(Proc, String)> {
    let mut c = std::process::Command::new(cx.exe);
    c.args(["replica", "serve", "--volume", cx.volume, "--size", &cx.size.to_string(), "--listen", "127.0.0.1:0"]);
    c.arg("--secret-file").arg(cx.secret).arg("--dir").arg(dir);
    let (p, addr) = spawn_and_wait(name, c, &cx.log_dir.join(format!("{name}.log")), "listening")?;
    if addr.is_empty() {
        bail!("{name} did not say where it listens");
    }
    Ok((p, addr))
}

/// `staleReplicaTimeout`: a whole number of minutes as in Longhorn, or a number with a
/// unit (`90s`, `5m`, `2h`).
pub fn parse_timeout(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "m"),
    };
    let n: u64 = num.parse().map_err(|_| anyhow!("stale replica timeout {s:?}: expected minutes, or a number with s, m or h"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        u => bail!("stale replica timeout {s:?}: unknown unit {u:?} (s, m or h)"),
    };
    let secs = n.checked_mul(mult).ok_or_else(|| anyhow!("stale replica timeout {s:?} is too large"))?;
    if secs == 0 {
        bail!("stale replica timeout must be more than 0");
    }
    Ok(Duration::from_secs(secs))
}

/// The value as stored in a volume spec (`staleReplicaTimeout`, minutes).
pub fn stored_timeout(spec_file: &Path) -> Option<u64> {
    let v: Value = serde_json::from_slice(&std::fs::read(spec_file).ok()?).ok()?;
    v["staleReplicaTimeout"].as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("30").expect("minutes"), Duration::from_secs(1800));
        assert_eq!(parse_timeout("90s").expect("seconds"), Duration::from_secs(90));
        assert_eq!(parse_timeout("2h").expect("hours"), Duration::from_secs(7200));
        for bad in ["", "0", "5d", "x", "-1"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} accepted");
        }
    }
}
