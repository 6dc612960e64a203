//! The engine's scheduling policy, as `ps -o cls` shows it: every thread of `engine
//! serve`, the NBD connection threads made while clients are connected included, runs
//! under SCHED_BATCH by default (a woken I/O thread does not preempt the running one,
//! so requests are taken in batches), and under the default policy with
//! `--normal-scheduling`. The I/O it serves meanwhile is checked by fio's verify.

use longhorn_tests::*;
use std::collections::BTreeMap;

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// Every thread of `pid`: its name and scheduling policy (field 41 of its `stat`).
fn policies(pid: i32) -> BTreeMap<i32, (String, u32)> {
    let mut out = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        // The name is in parentheses and may hold spaces: fields are counted after it.
        let (name, rest) = match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) => (stat[a + 1..b].to_string(), &stat[b + 2..]),
            _ => panic!("unexpected stat line: {stat}"),
        };
        // `rest` starts at field 3 (state); policy is field 41.
        let policy: u32 = rest.split_whitespace().nth(41 - 3).and_then(|f| f.parse().ok()).expect("policy field");
        let tid: i32 = t.file_name().to_string_lossy().parse().expect("tid");
        out.insert(tid, (name, policy));
    }
    out
}

/// How many NBD connection threads `seen` holds.
fn conn_threads(seen: &BTreeMap<i32, (String, u32)>) -> usize {
    seen.values().filter(|(n, _)| n.starts_with("nbd-conn")).count()
}

/// Runs fio with two NBD connections against `c` for a few seconds and returns the
/// engine's threads as seen while both connections were open.
fn threads_under_load(c: &Cluster) -> BTreeMap<i32, (String, u32)> {
    let pid = c.engine.as_ref().expect("engine").proc.pid();
    let uri = c.uri();
    let fio = std::thread::spawn(move || {
        fio(&format!(
            "--name=sched --ioengine=nbd --uri='{uri}' --rw=randwrite --bs=4k --iodepth=16 --numjobs=2 \
             --size=16M --offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
             --time_based --runtime=3"
        ))
    });
    // Sampled until both connections have their threads (or fio has ended).
    let mut seen = policies(pid);
    for _ in 0..60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = policies(pid);
        if conn_threads(&seen) >= 2 || fio.is_finished() {
            break;
        }
    }
    let (ok, errs, out) = fio.join().expect("fio thread");
    assert!(ok && errs == 0, "fio verify failed:\n{out}");
    assert!(conn_threads(&seen) >= 2, "no NBD connection threads seen: {seen:?}");
    seen
}

#[test]
fn engine_threads_run_under_sched_batch() {
    assert!(have("fio"), "fio is needed (tests/run installs it)");
    let c = Cluster::new("vol1", 64 * MB, 1);
    let seen = threads_under_load(&c);
    let other: Vec<_> = seen.values().filter(|(_, p)| *p != SCHED_BATCH).collect();
    assert!(other.is_empty(), "engine threads not under SCHED_BATCH: {other:?} (all: {seen:?})");
}

/// `--normal-scheduling`, or LONGHORN_NORMAL_SCHEDULING=1 in the environment (how
/// engines started by `longhorn up` or the manager are told).
#[test]
fn normal_scheduling_keeps_the_default_policy() {
    assert!(have("fio"), "fio is needed (tests/run installs it)");
    for how in ["flag", "env"] {
        let mut c = Cluster::without_engine("vol1", 64 * MB, 1);
        match how {
            "flag" => c.engine_extra.push("--normal-scheduling".into()),
            _ => c.engine_env.push(("LONGHORN_NORMAL_SCHEDULING".into(), "1".into())),
        }
        c.start_engine();
        let seen = threads_under_load(&c);
            let other: Vec<_> = seen.values().filter(|(_, p)| *p != SCHED_OTHER).collect();
        assert!(other.is_empty(), "engine threads not under SCHED_OTHER ({how}): {other:?} (all: {seen:?})");
    }
}
