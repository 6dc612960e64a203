//! The `longhorn up` processes the manager starts: one per attached volume, each in
//! its own session (setsid) with its output in a log file, so it outlives the manager
//! (a `kill -9` of the manager, or its stop, leaves the volumes serving). A process is
//! known by pid plus start time, so a pid reused after a reboot or a long time is
//! never mistaken for ours.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The start time (field 22 of /proc/PID/stat, clock ticks since boot) of a live,
/// non-zombie process.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after
    // its last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), so field 22 is f[19].
    if matches!(f.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// Whether `pid` is still our `longhorn up`: the same start time, and its command line
/// is `... up VOLUME ...` (after a reboot another process may have both the pid and the
/// start tick; it must never be adopted, nor signalled).
pub fn alive(pid: i32, start: u64) -> bool {
    alive_as(pid, start, "up")
}

/// As [`alive`], for a `longhorn WORD ...` process (`up`, `replica`).
pub fn alive_as(pid: i32, start: u64, word: &str) -> bool {
    if start_time(pid) != Some(start) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    raw.split(|b| *b == 0).nth(1) == Some(word.as_bytes())
}

pub struct UpArgs<'a> {
    pub exe: &'a Path,
    pub volume: &'a str,
    pub size: u64,
    pub replicas: usize,
    pub remote_replicas: &'a [String],
    pub data_dir: &'a Path,
    pub run_dir: &'a Path,
    pub frontend: &'a str,
    pub stale_minutes: u64,
    /// Serve replica-0 in the engine's process (`up --embedded-replica`).
    pub embedded_replica: bool,
    pub recurring_jobs: &'a serde_json::Value,
    /// ReadWriteMany: the share's address, NFS port, and the file naming who may mount.
    pub share: Option<(String, u16, PathBuf)>,
    pub log: &'a Path,
    pub settings: &'a Path,
    pub env: &'a HashMap<String, String>,
}

/// Starts `longhorn up` for a volume; returns (pid, start time). A thread reaps it
/// when it exits, so a dead `up` is seen as dead (not a zombie) by [`alive`].
pub fn spawn_up(a: &UpArgs) -> Result<(i32, u64)> {
    if let Some(d) = a.log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.log)
        .with_context(|| format!("opening {}", a.log.display()))?;
    let log2 = log.try_clone().with_context(|| format!("opening {}", a.log.display()))?;
    let jobs = serde_json::to_string(a.recurring_jobs).context("encoding the recurring jobs")?;
    let mut c = Command::new(a.exe);
    c.arg("up")
        .arg(a.volume)
        .args(["--size", &a.size.to_string(), "--replicas", &a.replicas.to_string()])
        .arg("--data-dir")
        .arg(a.data_dir)
        .arg("--run-dir")
        .arg(a.run_dir)
        .args(["--frontend", a.frontend])
        .args(["--stale-replica-timeout", &a.stale_minutes.to_string()])
        .args(["--recurring-jobs", &jobs]);
    for r in a.remote_replicas {
        c.args(["--remote-replica", r]);
    }
    if a.embedded_replica {
        c.arg("--embedded-replica");
    }
    if let Some((bind, port, clients)) = &a.share {
        c.args(["--access-mode", "rwx", "--share-bind", bind, "--share-port", &port.to_string()]).arg("--share-clients").arg(clients);
    }
    // The engine's recurring backups read the backup target from the same settings
    // file the manager writes, and S3 credentials from their environment.
    c.env("LONGHORN_SETTINGS", a.settings);
    // Plain logs: the manager reads the replicas' "replica serving ... addr=" lines.
    c.env("NO_COLOR", "1");
    for (k, v) in a.env {
        c.env(k, v);
    }
    c.stdin(Stdio::null()).stdout(log).stderr(log2);
    spawn_session(c, &format!("longhorn up {}", a.volume), a.log)
}

/// Starts `c` in a session of its own (so it outlives the manager), with a thread that
/// reaps it when it exits (a dead process is then seen as dead, not a zombie); returns
/// (pid, start time). `what` names it in logs and errors, `log` is where it writes.
pub fn spawn_session(mut c: Command, what: &str, log: &Path) -> Result<(i32, u64)> {
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
    let pid = child.id() as i32;
    let name = what.to_string();
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || match child.wait() {
            Ok(st) => tracing::info!(pid, "{name} exited: {st}"),
            Err(e) => tracing::warn!(pid, "waiting for {name}: {e}"),
        })
        .context("starting the reaper thread")?;
    // The start time is read right away: the process exists until reaped.
    let t = Instant::now();
    loop {
        if let Some(st) = start_time(pid) {
            return Ok((pid, st));
        }
        if t.elapsed() > Duration::from_secs(2) {
            bail!("{what} exited at once (see {})", log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGTERM, and wait until it is gone (up to `wait`; `up` stops its engine and then
/// its replicas, each cleanly). Then SIGKILL as a last resort.
pub fn stop(pid: i32, start: u64, wait: Duration) -> Result<()> {
    stop_as(pid, start, wait, "up")
}

/// As [`stop`], for a `longhorn WORD ...` process.
pub fn stop_as(pid: i32, start: u64, wait: Duration, word: &str) -> Result<()> {
    if !alive_as(pid, start, word) {
        return Ok(());
    }
    // SAFETY: kill(2) on a pid we checked is our process (start time matches).
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(anyhow!(e).context(format!("signalling longhorn {word} (pid {pid})")));
        }
    }
    let t = Instant::now();
    while t.elapsed() < wait {
        if !alive_as(pid, start, word) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(pid, "longhorn {word} did not stop in {wait:?}; killing it");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    bail!("longhorn {word} (pid {pid}) did not stop in {wait:?} and was killed")
}

/// The last non-empty line of a log: what a failed `up` said last.
pub fn last_log_line(log: &PathBuf) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// The engine and replica processes of `volume` that no live `longhorn up` owns any
/// more: `up` puts its children in process groups of their own, so when `up` itself is
/// killed they keep serving (the volume's I/O goes on). A new `up` on the same
/// directories cannot start beside them (the NBD socket and the replicas' files are
/// theirs), and a detach or delete must not leave them running. (pid, start time,
/// "up" | "engine" | "replica").
pub fn leftovers(volume: &str, data_dir: &Path, run_dir: &Path) -> Vec<(i32, u64, &'static str)> {
    let replica_prefix = format!("{}/", data_dir.join(volume).display());
    let run = run_dir.display().to_string();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let after = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str());
        let serves = |what: &str| args.windows(2).any(|w| w[0] == what && w[1] == "serve");
        // An `up` of this volume the state does not name (started just before a crash
        // of the manager that could not record it) would restart what is stopped here.
        let data = data_dir.display().to_string();
        if args.get(1).map(String::as_str) == Some("up") && args.get(2).map(String::as_str) == Some(volume) && after("--data-dir") == Some(data.as_str()) {
            if let Some(st) = start_time(pid) {
                out.push((pid, st, "up"));
            }
            continue;
        }
        if after("--volume") != Some(volume) {
            continue;
        }
        let kind = if serves("engine") && after("--run-dir") == Some(run.as_str()) {
            "engine"
        } else if serves("replica") && after("--dir").is_some_and(|d| d.starts_with(&replica_prefix)) {
            "replica"
        } else {
            continue;
        };
        if let Some(st) = start_time(pid) {
            out.push((pid, st, kind));
        }
    }
    out
}

/// Stops the leftovers of [`leftovers`] cleanly: the engine first (SIGTERM: it flushes
/// the replicas and closes its exports), then the replicas. An engine that will not
/// stop (it refuses while its device is mounted) is an error naming it, and the
/// replicas under it are left alone.
pub fn stop_leftovers(volume: &str, data_dir: &Path, run_dir: &Path) -> Result<()> {
    let left = leftovers(volume, data_dir, run_dir);
    if left.is_empty() {
        return Ok(());
    }
    // `up` first: it stops its engine and replicas itself, cleanly.
    for kind in ["up", "engine", "replica"] {
        let these: Vec<(i32, u64)> = left.iter().filter(|l| l.2 == kind).map(|l| (l.0, l.1)).collect();
        for &(pid, _) in &these {
            tracing::warn!(volume, pid, kind, "stopping a process that no longhorn up owns any more");
            // SAFETY: kill(2) on a pid whose command line we just read.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t = Instant::now();
        // Start times only (`alive` is for our `up`): these were found by command line.
        let running = |p: i32, s: u64| start_time(p) == Some(s);
        while these.iter().any(|&(p, s)| running(p, s)) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stuck: Vec<i32> = these.iter().filter(|&&(p, s)| running(p, s)).map(|&(p, _)| p).collect();
        if stuck.is_empty() {
            continue;
        }
        if kind == "up" || kind == "engine" {
            bail!(
                "the {kind} of volume {volume} (pid {}) that no manager owns does not stop (is its device mounted? unmount it)",
                stuck.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        for p in stuck {
            tracing::warn!(volume, pid = p, "the replica did not stop in 20 s; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    Ok(())
}

/// Where the block device at `dev` is mounted, if it is. Compared by device number:
/// `/dev/longhorn/VOL` is a node of its own (or a link) and the mount table names the
/// kernel's device (`/dev/loop1`, `/dev/nbd0`, `/dev/ublkb0`).
/// Where block device `dev` is mounted, but under `except` (a ReadWriteMany volume's
/// own share, which `up` unmounts as it stops).
pub fn mounted_at(dev: &str, except: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let rdev = |p: &str| std::fs::metadata(p).ok().filter(|m| m.file_type().is_block_device()).map(|m| m.rdev());
    let want = rdev(dev)?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (src, mp) = (f.next()?, f.next()?);
        let mp = mp.replace("\\040", " ");
        (src.starts_with("/dev/") && rdev(src)? == want && !Path::new(&mp).starts_with(except)).then_some(mp)
    })
}
