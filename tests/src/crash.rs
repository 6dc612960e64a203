//! The crash harness (tests/tests/crash.rs, tests/crash/campaign): a volume of three
//! replicas and an engine, a writer of acknowledged records (tests/crash/recwriter.py)
//! and fio writing into it, processes killed with SIGKILL (or aborted at a
//! `LONGHORN_CRASH_AT` fault point), restarted as `longhorn up` would restart them, and
//! checked after every kill:
//!
//! - every record acknowledged with FUA, or acknowledged before an acknowledged FLUSH,
//!   reads back, or a later record sent to the same slot does; never an older one,
//!   never zeros, never bytes nobody sent there ([`check_records`]);
//! - the fio data written and flushed before the kill verifies (`--verify_only`), or
//!   fio running across a replica kill saw no error;
//! - after a clean stop, every replica directory opens (`Store::open`) and every
//!   replica the engine used holds the same chain of snapshots and the same bytes,
//!   read by an independent reader of the layer files, as the volume read through the
//!   engine before the stop ([`Rig::at_rest`]).
//!
//! Volume layout: records in [0, 8 MiB), fio in [8, 24 MiB), random base data (so a
//! rebuild and a backup have something to copy) in [24 MiB, end).

use crate::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const REC: u64 = 4096;
pub const REC_BASE: u64 = 0;
pub const SLOTS: u64 = 2048;
pub const FIO_OFF: u64 = 8 * MB;
pub const FIO_LEN: u64 = 16 * MB;
pub const BASE_OFF: u64 = 24 * MB;

/// xorshift64*: the harness's random instants and choices, reproducible from the seed
/// it prints (`LONGHORN_CRASH_SEED`).
pub struct Rng(u64);

impl Rng {
    pub fn from_env(salt: &str) -> Rng {
        let seed = std::env::var("LONGHORN_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
            t ^ ((std::process::id() as u64) << 32)
        });
        let mixed = salt.bytes().fold(seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        eprintln!("[crash] {salt}: LONGHORN_CRASH_SEED={seed}");
        Rng(mixed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }

    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// How long a scenario runs: `LONGHORN_CRASH_ROUNDS` rounds (else the scenario's short
/// default) and at most `LONGHORN_CRASH_SECS` seconds (else 150).
pub struct Budget {
    rounds: u64,
    deadline: Instant,
}

impl Budget {
    pub fn from_env(default_rounds: u64) -> Budget {
        let rounds = std::env::var("LONGHORN_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_rounds);
        let secs = std::env::var("LONGHORN_CRASH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
        Budget { rounds, deadline: Instant::now() + Duration::from_secs(secs) }
    }

    /// Whether round `r` (from 0) is to be run.
    pub fn more(&self, r: u64) -> bool {
        r < self.rounds && Instant::now() < self.deadline
    }
}

/// What a scenario did, printed as its `[crash]` line when the scenario ends (also when
/// it fails, marked FAILED).
#[derive(Default)]
pub struct Stats {
    pub rounds: u64,
    pub kills: u64,
    pub processes_killed: u64,
    pub writes_checked: u64,
    pub lost: u64,
    pub fio_verified: u64,
    pub rebuilds: u64,
    pub extra: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------- record log check

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RecordCheck {
    /// Acknowledged writes that were durable (FUA, or followed by an acknowledged FLUSH).
    pub durable: u64,
    /// Slots whose last durable record read back as it.
    pub exact: u64,
    /// Slots that read as a later record (acknowledged without FLUSH yet, or in flight).
    pub later: u64,
    /// Slots that lost their last durable record: an older one, or zeros.
    pub lost: u64,
    /// Slots holding bytes that no intent in the log put there.
    pub corrupt: u64,
    pub problems: Vec<String>,
}

struct Intent {
    slot: u64,
    crc: u32,
}

/// The table of CRC-32 (IEEE, as Python's zlib.crc32).
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// Checks the record region of `image` (the volume's bytes) against the writer's log.
pub fn check_records(log: &Path, image: &[u8]) -> RecordCheck {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut intents: HashMap<u64, Intent> = HashMap::new();
    let mut durable: HashSet<u64> = HashSet::new();
    let mut undurable: Vec<u64> = Vec::new();
    let mut pending: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut fua: HashSet<u64> = HashSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        // A line cut short by a killed writer is the last one; it says nothing.
        match (f.first().copied(), num(1)) {
            (Some("I"), Some(seq)) if f.len() == 5 => {
                let (Some(slot), Some(crc)) = (num(2), num(3)) else { continue };
                intents.insert(seq, Intent { slot, crc: crc as u32 });
                if f[4] == "1" {
                    fua.insert(seq);
                }
            }
            (Some("A"), Some(seq)) => {
                if fua.contains(&seq) {
                    durable.insert(seq);
                } else {
                    undurable.push(seq);
                }
            }
            (Some("S"), Some(fid)) => {
                pending.insert(fid, undurable.clone());
            }
            (Some("F"), Some(fid)) => {
                for s in pending.remove(&fid).unwrap_or_default() {
                    durable.insert(s);
                }
                undurable.retain(|s| !durable.contains(s));
            }
            (Some("X"), Some(fid)) => {
                pending.remove(&fid);
            }
            _ => {}
        }
    }
    let mut last_durable: HashMap<u64, u64> = HashMap::new();
    for &s in &durable {
        let slot = intents[&s].slot;
        let e = last_durable.entry(slot).or_insert(s);
        *e = (*e).max(s);
    }
    let mut r = RecordCheck { durable: durable.len() as u64, ..Default::default() };
    let problem = |r: &mut RecordCheck, s: String| {
        if r.problems.len() < 12 {
            r.problems.push(s);
        }
    };
    for slot in 0..SLOTS {
        let at = (REC_BASE + slot * REC) as usize;
        let b = &image[at..at + REC as usize];
        let want = last_durable.get(&slot).copied();
        if b.iter().all(|&x| x == 0) {
            if let Some(d) = want {
                r.lost += 1;
                problem(&mut r, format!("slot {slot}: reads zeros, but record {d} was acknowledged durable there"));
            }
            continue;
        }
        let mut body = b.to_vec();
        let crc_field = u32::from_le_bytes(body[24..28].try_into().expect("4 bytes"));
        body[24..28].fill(0);
        let seq = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let rslot = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let intent = intents.get(&seq);
        if &b[..8] != b"LHREC001" || crc32(&body) != crc_field || rslot != slot || intent.is_none_or(|i| i.slot != slot || i.crc != crc_field) {
            r.corrupt += 1;
            problem(&mut r, format!("slot {slot}: holds bytes no write in the log put there (seq field {seq}, slot field {rslot}); last durable {want:?}"));
            continue;
        }
        match want {
            Some(d) if seq < d => {
                r.lost += 1;
                problem(&mut r, format!("slot {slot}: reads older record {seq}; record {d} was acknowledged durable there"));
            }
            Some(d) if seq == d => r.exact += 1,
            _ => r.later += 1,
        }
    }
    r
}

/// The highest sequence number in the writer's log (0 when empty).
fn last_seq(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("I ").and_then(|r| r.split_whitespace().next()).and_then(|s| s.parse().ok()))
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------- the record writer

pub struct Writer {
    child: Child,
    stop_file: PathBuf,
    lines: mpsc::Receiver<String>,
    pub out: Vec<String>,
    errlog: PathBuf,
}

pub struct WriterEnd {
    pub errors: u64,
    pub acked: u64,
    pub summary: String,
}

impl Writer {
    /// Waits until the writer said `word`; false if it exited or `t` passed first.
    fn wait_line(&mut self, word: &str, t: Duration) -> bool {
        let until = Instant::now() + t;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.starts_with(word);
                    self.out.push(l);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Waits until the writer has had its first writes acknowledged.
    pub fn wait_warm(&mut self) {
        let ok = self.wait_line("warm", Duration::from_secs(30));
        assert!(ok, "the record writer did not get going: {:?}\n{}", self.out, std::fs::read_to_string(&self.errlog).unwrap_or_default());
    }

    /// Asks the writer to stop and waits for it (it FLUSHes what it wrote without FUA).
    pub fn stop(self) -> WriterEnd {
        std::fs::write(&self.stop_file, b"stop").expect("stop file");
        self.finish(Duration::from_secs(60))
    }

    /// Waits for a writer that is to end by itself (its engine died).
    pub fn finish(mut self, t: Duration) -> WriterEnd {
        let ok = self.wait_line("done", t);
        if !ok {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let summary = self.out.iter().find(|l| l.starts_with("done")).cloned().unwrap_or_else(|| "done (killed: it hung)".into());
        let field = |k: &str| {
            summary.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok()).unwrap_or(if ok { 0 } else { 1 })
        };
        WriterEnd { errors: field("errors="), acked: field("acked="), summary }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- the rig

/// Which processes a kill takes down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Victim {
    Replica(usize),
    TwoReplicas(usize, usize),
    Engine,
    All,
}

pub struct Rig {
    pub c: Cluster,
    pub scenario: String,
    pub log: PathBuf,
    pub rng: Rng,
    pub stats: Stats,
    t0: Instant,
    logs: u64,
    /// The snapshot chain seen at rest last.
    pub last_chain: Vec<String>,
    /// What each snapshot read as when last seen (a hash of its whole view).
    pub views: BTreeMap<String, u64>,
}

/// A hash of all the bytes of snapshot `name` as replica directory `dir` holds it.
pub fn view_of(dir: &Path, name: &str, size: u64) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&read_layers(&chain_to(dir, name), size));
    h.finish()
}

/// Whether layer `file` of `dir` is marked Removed (kept under the head, partly punched:
/// its own view is no longer the snapshot's).
fn snapshot_removed(dir: &Path, file: &str) -> bool {
    std::fs::read_to_string(dir.join(format!("{file}.meta")))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|m| m["Removed"] == true)
}

fn env_of(kv: &[(&str, &str)]) -> Vec<(String, String)> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `LONGHORN_CRASH_AT=step`.
pub fn crash_at(step: &str) -> Vec<(String, String)> {
    env_of(&[("LONGHORN_CRASH_AT", step)])
}

pub fn recwriter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crash").join("recwriter.py")
}

impl Rig {
    /// A 64 MiB volume of three replicas with base data written and flushed.
    pub fn new(scenario: &str, volume: &str) -> Rig {
        let c = Cluster::new(volume, 64 * MB, 3);
        let rig = Rig::on(c, scenario);
        // Random bytes past BASE_OFF, a hole before it (nbdcopy skips holes into a
        // volume that reads as zeros).
        let base = rig.c.path("base.raw");
        sh(&format!(
            "truncate -s {} '{1}' && head -c {2} /dev/urandom | dd of='{1}' bs=1M seek={3} conv=notrunc status=none",
            rig.c.size,
            base.display(),
            rig.c.size - BASE_OFF,
            BASE_OFF / MB
        ));
        sh(&format!("nbdcopy --destination-is-zero --flush -- '{}' '{}'", base.display(), rig.c.uri()));
        rig
    }

    /// A rig on a running cluster, with nothing written.
    pub fn on(c: Cluster, scenario: &str) -> Rig {
        for t in ["fio", "nbdcopy", "/usr/bin/python3"] {
            assert!(have(t), "{t} is needed (tests/run installs it)");
        }
        let log = c.path("records.log");
        Rig {
            c,
            scenario: scenario.into(),
            log,
            rng: Rng::from_env(scenario),
            stats: Stats::default(),
            t0: Instant::now(),
            logs: 0,
            last_chain: Vec::new(),
            views: BTreeMap::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.c.size
    }

    fn next_log(&mut self, what: &str) -> PathBuf {
        self.logs += 1;
        self.c.path(&format!("{what}-{:03}.log", self.logs))
    }

    /// Starts the record writer on the engine's NBD export.
    pub fn writer(&mut self, depth: u32) -> Writer {
        let stop_file = self.c.path("writer.stop");
        let _ = std::fs::remove_file(&stop_file);
        let errlog = self.next_log("writer");
        let err = std::fs::File::create(&errlog).expect("writer log");
        let mut child = Command::new("/usr/bin/python3")
            .arg(recwriter())
            .args(["--uri", &self.c.uri(), "--log"])
            .arg(&self.log)
            .args(["--base", &REC_BASE.to_string(), "--slots", &SLOTS.to_string()])
            .args(["--seq-start", &last_seq(&self.log).to_string(), "--seed", &self.rng.next().to_string()])
            .args(["--depth", &depth.to_string(), "--stop-file"])
            .arg(&stop_file)
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn the record writer");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Writer { child, stop_file, lines: rx, out: Vec::new(), errlog }
    }

    /// Replica `i` started again on its directory (a new port), with `env`.
    pub fn restart_replica(&mut self, i: usize, env: &[(String, String)]) {
        // The old process first: a replica directory serves one process at a time (it
        // is locked), as `longhorn up` stops a replica before it starts it again.
        self.c.replicas[i].proc.kill9();
        let dir = self.c.replicas[i].dir.clone();
        let log = self.next_log(&format!("r{i}"));
        let mut env = env.to_vec();
        env.push(self.c.secret_env());
        let (proc, addr) = serve_replica(&dir, &self.c.volume, self.c.size, &log, &env);
        self.c.replicas[i] = Replica { proc, addr, dir };
    }

    /// The engine started on the current replica addresses, with `env`. A replica
    /// still busy with a long request (a merge, say) of an engine that was killed keeps
    /// that engine's lease until the request ends, and refuses the new engine until
    /// then: the start is tried again, as a supervisor would, for up to a minute.
    pub fn start_engine(&mut self, env: &[(String, String)]) {
        let args = self.c.engine_args();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let t = Instant::now();
        loop {
            let log = self.next_log("engine");
            match spawn_env(&a, &log, "ready", env) {
                Ok((proc, uri)) => {
                    self.c.engine = Some(Engine { proc, uri, sock: self.c.path("vol.nbd") });
                    return;
                }
                Err(e) if e.contains("a second engine is refused") && t.elapsed() < Duration::from_secs(60) => {
                    self.note("engine-start-refused");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("{}: the engine does not start: {e}", self.scenario),
            }
        }
    }

    /// SIGKILLs what `v` names, all signals sent before any is waited for.
    pub fn kill(&mut self, v: Victim) {
        let mut pids = Vec::new();
        let reps: Vec<usize> = match v {
            Victim::Replica(i) => vec![i],
            Victim::TwoReplicas(a, b) => vec![a, b],
            Victim::Engine => vec![],
            Victim::All => (0..self.c.replicas.len()).collect(),
        };
        if matches!(v, Victim::Engine | Victim::All) {
            if let Some(e) = self.c.engine.as_mut() {
                if e.proc.alive() {
                    pids.push(e.proc.pid());
                }
            }
        }
        for &i in &reps {
            if self.c.replicas[i].proc.alive() {
                pids.push(self.c.replicas[i].proc.pid());
            }
        }
        for &p in &pids {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if matches!(v, Victim::Engine | Victim::All) {
            if let Some(mut e) = self.c.engine.take() {
                e.proc.kill9();
            }
        }
        for &i in &reps {
            self.c.replicas[i].proc.kill9();
        }
        self.stats.kills += 1;
        self.stats.processes_killed += pids.len() as u64;
    }

    /// The engine's replica list (empty when it does not answer).
    pub fn replica_ls(&self) -> Vec<Value> {
        let o = self.c.cli(&["replica", "ls", "-v", &self.c.volume, "--json"]);
        serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    fn mode_of(ls: &[Value], addr: &str) -> String {
        ls.iter().filter(|r| r["address"] == addr).filter_map(|r| r["mode"].as_str()).last().unwrap_or("absent").to_string()
    }

    /// `replica add ADDR --wait`; Err is its message.
    pub fn add(&self, addr: &str) -> Result<(), String> {
        let o = self.c.cli(&["replica", "add", addr, "-v", &self.c.volume, "--wait"]);
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        }
    }

    /// Brings back what died, as `longhorn up` does: a replica process that exited is
    /// started again on its directory; an engine that died is started again with the
    /// same replicas (it keeps those with the newest revision); a replica the engine
    /// does not use (ERR, or not listed) is stopped, started again and added, so it is
    /// rebuilt. Returns once every replica is RW.
    pub fn heal(&mut self) {
        for i in 0..self.c.replicas.len() {
            if !self.c.replicas[i].proc.alive() {
                self.restart_replica(i, &[]);
            }
        }
        let engine_up = self.c.engine.as_mut().is_some_and(|e| e.proc.alive());
        if !engine_up {
            self.c.engine = None;
            self.start_engine(&[]);
        }
        let t = Instant::now();
        loop {
            let ls = self.replica_ls();
            let modes: Vec<String> = self.c.replicas.iter().map(|r| Self::mode_of(&ls, &r.addr)).collect();
            if modes.iter().all(|m| m == "RW") {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(180), "{}: replicas not all RW after 180 s: {ls:?}\nengine log:\n{}", self.scenario, self.c.engine_log());
            let Some(i) = modes.iter().position(|m| m != "RW" && m != "WO") else {
                // A rebuild is running: wait for it.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if modes.iter().all(|m| m != "RW" && m != "WO") && !ls.iter().any(|r| r["mode"] == "RW") {
                // Every replica failed: the engine has nothing to rebuild from. As an
                // operator would, stop it and start it again: it takes the replicas
                // with the newest data.
                if let Some(mut e) = self.c.engine.take() {
                    e.proc.kill9();
                }
                for i in 0..self.c.replicas.len() {
                    self.restart_replica(i, &[]);
                }
                self.start_engine(&[]);
                self.note("engine-restarts");
                continue;
            }
            self.restart_replica(i, &[]);
            let addr = self.c.replicas[i].addr.clone();
            match self.add(&addr) {
                Ok(()) => self.stats.rebuilds += 1,
                // Another chain change may hold the volume for a moment: tried again.
                Err(e) if e.contains("in progress") => std::thread::sleep(Duration::from_millis(200)),
                Err(e) => panic!("{}: replica add {addr}: {e}\nengine log:\n{}", self.scenario, self.c.engine_log()),
            }
        }
    }

    /// The volume's bytes as a client reads them through the engine.
    pub fn read_volume(&mut self, name: &str) -> Vec<u8> {
        let f = self.c.path(name);
        sh(&format!("nbdcopy -- '{}' '{}'", self.c.uri(), f.display()));
        std::fs::read(&f).expect("volume copy")
    }

    /// Checks the records in `image` against the log; counts and fails on loss.
    pub fn check_records(&mut self, image: &[u8], when: &str) -> RecordCheck {
        if !self.log.exists() {
            // This scenario writes no records (ext4 owns the whole volume).
            return RecordCheck::default();
        }
        let r = check_records(&self.log, image);
        self.stats.lost += r.lost + r.corrupt;
        self.stats.writes_checked = r.durable;
        assert!(
            r.lost == 0 && r.corrupt == 0,
            "{} ({when}): acknowledged records lost: {r:?}\nengine log:\n{}",
            self.scenario,
            self.c.engine_log()
        );
        r
    }

    /// fio writes the fio region with seed `seed` and FLUSHes at the end.
    pub fn fio_fill(&self, seed: u64) {
        let (ok, errs, out) = fio(&self.fio_job(seed, "--do_verify=0 --end_fsync=1"));
        assert!(ok && errs == 0, "{}: fio fill failed:\n{out}\nengine log:\n{}", self.scenario, self.c.engine_log());
    }

    /// fio's verification alone of what `fio_fill(seed)` wrote.
    pub fn fio_verify(&mut self, seed: u64, when: &str) {
        let (ok, errs, out) = fio(&self.fio_job(seed, "--verify_only --do_verify=1"));
        if !(ok && errs == 0) {
            self.stats.lost += 1;
            panic!("{} ({when}): fio --verify_only found data written and flushed before the kill changed:\n{out}", self.scenario);
        }
        self.stats.fio_verified += 1;
    }

    pub fn fio_job(&self, seed: u64, extra: &str) -> String {
        format!(
            "--name=crash --ioengine=nbd --uri='{}' --rw=randwrite --bs=4k --iodepth=8 --offset={FIO_OFF} --size={FIO_LEN} \
             --verify=crc32c --verify_fatal=1 --randseed={seed} {extra}",
            self.c.uri()
        )
    }

    /// Snapshot layers of replica `i`'s chain, oldest first (from its files), each
    /// marked `(removed)` when it is.
    pub fn chain_names(&self, i: usize) -> Vec<String> {
        let dir = &self.c.replicas[i].dir;
        head_chain(dir)
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(|s| s.to_string()))
            .filter(|n| n.starts_with("volume-snap-"))
            .map(|n| if snapshot_removed(dir, &n) { format!("{n}(removed)") } else { n })
            .collect()
    }

    /// Stops the engine and the replicas cleanly and starts them again, replica `i`
    /// with `envs[i]` (fault points for the next round), the engine with `engine_env`;
    /// every replica must come up RW.
    pub fn restart_with(&mut self, envs: &[Vec<(String, String)>], engine_env: &[(String, String)]) {
        self.stop_all_cleanly();
        self.start_all(envs, engine_env);
    }

    /// Stops the engine, then the replicas, each cleanly.
    pub fn stop_all_cleanly(&mut self) {
        self.c.stop_engine();
        for rep in &mut self.c.replicas {
            assert!(rep.proc.term(), "{}: replica {} did not stop cleanly:\n{}", self.scenario, rep.dir.display(), rep.proc.log_text());
        }
    }

    fn start_all(&mut self, envs: &[Vec<(String, String)>], engine_env: &[(String, String)]) {
        for i in 0..self.c.replicas.len() {
            let env = envs.get(i).cloned().unwrap_or_default();
            self.restart_replica(i, &env);
        }
        self.start_engine(engine_env);
        let ls = self.replica_ls();
        for rep in &self.c.replicas {
            assert_eq!(Self::mode_of(&ls, &rep.addr), "RW", "{}: after a clean restart every replica is RW: {ls:?}", self.scenario);
        }
    }

    /// The checks at rest: the volume read through the engine holds every durable
    /// record; then a clean stop, and every replica directory opens and holds the same
    /// snapshots, each reading as it did when last seen, and the same bytes as the
    /// engine served. Then everything is started again with no fault point.
    pub fn at_rest(&mut self, when: &str) -> RecordCheck {
        let image = self.read_volume("at-rest.raw");
        let r = self.check_records(&image, when);
        self.stop_all_cleanly();
        let chains: Vec<Vec<String>> = (0..self.c.replicas.len()).map(|i| self.chain_names(i)).collect();
        let mut views = BTreeMap::new();
        for (i, rep) in self.c.replicas.iter().enumerate() {
            let s = longhorn_replica::Store::open(&rep.dir, Some(&self.c.volume))
                .unwrap_or_else(|e| panic!("{} ({when}): replica {} does not open: {e}", self.scenario, rep.dir.display()));
            let mut b = bytes::BytesMut::new();
            s.read_into(0, self.c.size as usize, &mut b).expect("read through the store");
            s.close().expect("close the store");
            let files = read_layers(&head_chain(&rep.dir), self.c.size);
            if files != image || b[..] != image[..] {
                let first = files.iter().zip(&image).position(|(a, b)| a != b).unwrap_or(0);
                self.stats.lost += 1;
                panic!(
                    "{} ({when}): replica {i} ({}) differs from the volume the engine served (first at byte {first}, block {}); chains {chains:?}",
                    self.scenario,
                    rep.dir.display(),
                    first / 4096
                );
            }
            assert_eq!(chains[i], chains[0], "{} ({when}): replica {i} has another chain of snapshots than replica 0", self.scenario);
            for name in &chains[i] {
                if name.ends_with("(removed)") {
                    continue;
                }
                let snap = name.trim_start_matches("volume-snap-").trim_end_matches(".img");
                let v = view_of(&rep.dir, snap, self.c.size);
                if let Some(&before) = views.get(snap).or(self.views.get(snap)) {
                    if before != v {
                        self.stats.lost += 1;
                        panic!("{} ({when}): snapshot {snap} on replica {i} no longer reads as it did", self.scenario);
                    }
                }
                views.insert(snap.to_string(), v);
            }
        }
        self.views = views;
        eprintln!("[crash] {} at rest: chain {:?}", self.scenario, chains[0]);
        self.last_chain = chains[0].clone();
        self.start_all(&[], &[]);
        self.stats.rounds += 1;
        r
    }

    /// `longhorn snapshot ls` as JSON.
    pub fn snapshots(&self) -> Vec<Value> {
        let o = self.c.cli(&["snapshot", "ls", "-v", &self.c.volume, "--json"]);
        serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    /// Runs `longhorn ARGS` in the background with this cluster's run dir and `env`.
    pub fn cli_bg(&self, args: &[&str], env: &[(String, String)]) -> Child {
        Command::new(bin())
            .args(args)
            .env("LONGHORN_RUN_DIR", self.c.run_dir())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run longhorn")
    }

    pub fn note(&mut self, key: &str) {
        *self.stats.extra.entry(key.to_string()).or_default() += 1;
    }
}

/// Waits for `child` to exit, at most `t`; returns (exited successfully, output).
pub fn wait_child(mut child: Child, t: Duration) -> (bool, String) {
    let until = Instant::now() + t;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            _ if Instant::now() > until => {
                let _ = child.kill();
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    match child.wait_with_output() {
        Ok(o) => (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))),
        Err(e) => (false, e.to_string()),
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let s = &self.stats;
        let extra: String = s.extra.iter().map(|(k, v)| format!(" {k}={v}")).collect();
        let line = format!(
            "[crash] scenario={} rounds={} kills={} processes_killed={} writes_checked={} lost={} fio_verified={} rebuilds={}{extra} secs={:.0}{}",
            self.scenario,
            s.rounds,
            s.kills,
            s.processes_killed,
            s.writes_checked,
            s.lost,
            s.fio_verified,
            s.rebuilds,
            self.t0.elapsed().as_secs_f64(),
            if std::thread::panicking() { " FAILED" } else { "" }
        );
        println!("{line}");
        // The campaign script collects these lines.
        if let Ok(p) = std::env::var("LONGHORN_CRASH_REPORT") {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

// ---------------------------------------------------------------- operation rounds

/// How an operation round crashes.
#[derive(Debug, Clone)]
pub enum Plan {
    /// SIGKILL of the victim at a random instant, up to `max_ms` after the operation started.
    Random(Victim, u64),
    /// These replicas run with `LONGHORN_CRASH_AT=step` and abort there.
    ReplicaFault(Vec<usize>, &'static str),
    /// The engine runs with `LONGHORN_CRASH_AT=step` and aborts there.
    EngineFault(&'static str),
}

/// What happened in a round, for the scenario's checks.
pub struct Outcome {
    /// The operation's command succeeded (its result was reported to the user).
    pub op_ok: bool,
    pub op_out: String,
    /// The planned fault point was reached (false: the operation never passed it).
    pub crashed: bool,
}

impl Rig {
    /// Restarts everything cleanly with the plan's fault points set.
    pub fn arm(&mut self, plan: &Plan) {
        let n = self.c.replicas.len();
        let mut envs = vec![Vec::new(); n];
        let mut engine_env = Vec::new();
        match plan {
            Plan::Random(..) => return,
            Plan::ReplicaFault(which, step) => which.iter().for_each(|&i| envs[i] = crash_at(step)),
            Plan::EngineFault(step) => engine_env = crash_at(step),
        }
        self.restart_with(&envs, &engine_env);
    }

    /// Carries out `plan` on an operation that started (`op`: its command, or None
    /// when `done` says when it ended): kills at a random instant, or waits for the
    /// armed processes to abort at their fault point. Returns whether a crash happened.
    pub fn crash(&mut self, plan: &Plan, done: &mut dyn FnMut(&mut Rig) -> bool) -> bool {
        match plan {
            Plan::Random(v, max_ms) => {
                std::thread::sleep(self.rng.ms(0, *max_ms));
                self.kill(*v);
                true
            }
            Plan::ReplicaFault(..) | Plan::EngineFault(_) => {
                let which: Vec<usize> = if let Plan::ReplicaFault(w, _) = plan { w.clone() } else { Vec::new() };
                let engine = matches!(plan, Plan::EngineFault(_));
                let t = Instant::now();
                let mut finished_at: Option<Instant> = None;
                loop {
                    let dead_reps = which.iter().filter(|&&i| !self.c.replicas[i].proc.alive()).count();
                    let engine_dead = engine && !self.c.engine.as_mut().is_some_and(|e| e.proc.alive());
                    // Any armed process that aborted means the step was reached; the
                    // others get a moment to reach it too.
                    if (engine && engine_dead) || (!which.is_empty() && dead_reps == which.len()) {
                        break;
                    }
                    if finished_at.is_none() && done(self) {
                        finished_at = Some(Instant::now());
                    }
                    if finished_at.is_some_and(|f| f.elapsed() > Duration::from_millis(500)) || t.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let dead_reps = which.iter().filter(|&&i| !self.c.replicas[i].proc.alive()).count() as u64;
                let engine_dead = engine && !self.c.engine.as_mut().is_some_and(|e| e.proc.alive());
                if engine_dead {
                    self.c.engine = None;
                }
                let n = dead_reps + engine_dead as u64;
                if n > 0 {
                    self.stats.kills += 1;
                    self.stats.processes_killed += n;
                } else {
                    self.note("fault-not-reached");
                }
                n > 0
            }
        }
    }

    /// Whether the volume can still serve I/O: its engine runs and one of its
    /// replicas is RW.
    pub fn serving(&mut self) -> bool {
        self.c.engine.as_mut().is_some_and(|e| e.proc.alive()) && self.replica_ls().iter().any(|r| r["mode"] == "RW")
    }

    /// One round of an operation under a crash: fio fills its region, the record
    /// writer runs, `op` starts the operation, `plan` crashes it, and once everything is
    /// brought back the records and fio's data are checked (the caller checks the
    /// operation's own outcome, then calls `at_rest`).
    pub fn op_round(&mut self, plan: &Plan, op: &mut dyn FnMut(&mut Rig) -> Child) -> Outcome {
        self.arm(plan);
        let seed = self.rng.below(1 << 30);
        self.fio_fill(seed);
        let mut w = self.writer(2);
        w.wait_warm();
        let ch = op(self);
        let waiter = std::thread::spawn(move || wait_child(ch, Duration::from_secs(120)));
        let crashed = self.crash(plan, &mut |_| waiter.is_finished());
        let (op_ok, op_out) = waiter.join().expect("waiter");
        eprintln!("[crash] {} round {}: {plan:?} crashed={crashed} op_ok={op_ok}", self.scenario, self.stats.rounds);
        self.settle(w, Some(seed), &format!("{plan:?}"));
        Outcome { op_ok, op_out, crashed }
    }

    /// Ends a round after its crash: the record writer is stopped when the volume kept
    /// serving (it must have seen no error then) or ends with its engine; what died is
    /// brought back; the records and what `fio_fill(seed)` wrote are checked.
    pub fn settle(&mut self, w: Writer, fio_seed: Option<u64>, what: &str) {
        if self.serving() {
            std::thread::sleep(self.rng.ms(20, 200));
            let end = w.stop();
            assert_eq!(end.errors, 0, "{}: I/O failed although the volume kept serving ({what}): {}\nengine log:\n{}", self.scenario, end.summary, self.c.engine_log());
        } else {
            w.finish(Duration::from_secs(30));
        }
        self.heal();
        let img = self.read_volume("after-heal.raw");
        self.check_records(&img, &format!("after {what}"));
        if let Some(seed) = fio_seed {
            self.fio_verify(seed, &format!("after {what}"));
        }
    }
}
