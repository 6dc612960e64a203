//! Crash campaigns (harness in tests/src/crash.rs): processes killed with SIGKILL at
//! random instants, or aborted at fault points, while a writer of FUA/FLUSH-acknowledged
//! records and fio write; what was killed is restarted as `longhorn up` would, and the
//! volume is checked after every kill. Each test prints a `[crash] scenario=...` line.
//!
//! The default run is short (a few rounds each); `tests/crash/campaign` runs long ones
//! (`LONGHORN_CRASH_ROUNDS`, `LONGHORN_CRASH_SECS`, `LONGHORN_CRASH_SEED`).

use longhorn_tests::crash::*;
use longhorn_tests::*;
use std::time::Duration;

/// One round of a plain kill: fio fills its region and FLUSHes (or, when only replicas
/// die, runs with verification across the kill), the record writer runs, `victim`
/// dies at a random instant, everything is brought back and checked.
fn kill_round(rig: &mut Rig, victim: Victim, depth: u32) {
    let seed = rig.rng.below(1 << 30);
    let replicas_only = matches!(victim, Victim::Replica(_) | Victim::TwoReplicas(..));
    let fio_live = if replicas_only {
        let job = rig.fio_job(seed, "--do_verify=1 --rate_iops=2500");
        Some(std::thread::spawn(move || fio(&job)))
    } else {
        rig.fio_fill(seed);
        None
    };
    let mut w = rig.writer(depth);
    w.wait_warm();
    std::thread::sleep(rig.rng.ms(10, 400));
    if let Some(f) = &fio_live {
        assert!(!f.is_finished(), "fio ended before the kill; the round would prove nothing");
    }
    rig.kill(victim);
    if replicas_only {
        std::thread::sleep(rig.rng.ms(50, 300));
    }
    // With replicas only killed, the volume serves on: the writer must see no error.
    rig.settle(w, (!replicas_only).then_some(seed), &format!("{victim:?} was killed"));
    if let Some(f) = fio_live {
        let (ok, errs, out) = f.join().expect("fio thread");
        assert!(ok && errs == 0, "{}: fio verify across the kill of {victim:?}:\n{out}\nengine log:\n{}", rig.scenario, rig.c.engine_log());
        rig.stats.fio_verified += 1;
    }
    rig.at_rest(&format!("at rest after {victim:?}"));
}

/// `depth`: the record writer's queue depth, by round (a deep queue puts several
/// writes in flight at the kill).
fn kill_campaign(scenario: &str, volume: &str, default_rounds: u64, depth: &[u32], victim: impl Fn(&mut Rng) -> Victim) {
    let mut rig = Rig::new(scenario, volume);
    let b = Budget::from_env(default_rounds);
    let mut r = 0;
    while b.more(r) {
        let v = victim(&mut rig.rng);
        kill_round(&mut rig, v, depth[r as usize % depth.len()]);
        r += 1;
    }
}

#[test]
fn crash_replica_kill() {
    kill_campaign("replica-kill", "crash1", 2, &[4], |g| Victim::Replica(g.below(3) as usize));
}

#[test]
fn crash_two_replicas_kill() {
    kill_campaign("two-replicas-kill", "crash2", 2, &[4], |g| {
        let a = g.below(3) as usize;
        Victim::TwoReplicas(a, (a + 1 + g.below(2) as usize) % 3)
    });
}

#[test]
fn crash_engine_kill() {
    kill_campaign("engine-kill", "crash3", 3, &[1, 8], |_| Victim::Engine);
}

#[test]
fn crash_all_kill() {
    kill_campaign("all-kill", "crash4", 3, &[1, 8], |_| Victim::All);
}

const SNAPSHOT_STEPS: &[&str] =
    &["snapshot:new-head", "snapshot:snap-meta", "snapshot:synced", "snapshot:linked", "snapshot:committed", "snapshot:cleaned"];

/// Which replicas a fault point is armed on: one, two, or all three.
fn some_replicas(g: &mut Rng) -> Vec<usize> {
    let first = g.below(3) as usize;
    match g.below(3) {
        0 => vec![first],
        1 => vec![first, (first + 1) % 3],
        _ => vec![0, 1, 2],
    }
}

/// A crash plan for round `r` of an operation: every fault point in `steps` in turn
/// (from a random start, so short runs cover different ones), with random-instant
/// kills of the engine, a replica, or everything in between.
fn plan_for(g: &mut Rng, r: u64, start: u64, steps: &[&'static str], engine_steps: &[&'static str], max_ms: u64) -> Plan {
    let faults = steps.len() + engine_steps.len();
    let k = (start + r) as usize % (faults + 3);
    if k < steps.len() {
        Plan::ReplicaFault(some_replicas(g), steps[k])
    } else if k < faults {
        Plan::EngineFault(engine_steps[k - steps.len()])
    } else {
        let one = Victim::Replica(g.below(3) as usize);
        let v = *g.pick(&[Victim::Engine, one, Victim::All]);
        Plan::Random(v, max_ms)
    }
}

fn snapshot_names(rig: &Rig) -> Vec<String> {
    rig.snapshots().iter().filter_map(|s| s["name"].as_str().map(|n| n.to_string())).filter(|n| n != "volume-head").collect()
}

#[test]
fn crash_snapshot_create() {
    let mut rig = Rig::new("snapshot-create", "crash7");
    let b = Budget::from_env(4);
    let start = rig.rng.below(64);
    let mut r = 0;
    while b.more(r) {
        let plan = plan_for(&mut rig.rng, r, start, SNAPSHOT_STEPS, &[], 30);
        let name = format!("c{r}");
        let vol = rig.c.volume.clone();
        let out = rig.op_round(&plan, &mut |rig| rig.cli_bg(&["snapshot", "create", &name, "-v", &vol], &[]));
        let names = snapshot_names(&rig);
        if out.op_ok {
            assert!(names.contains(&name), "snapshot-create ({plan:?}): `snapshot create {name}` succeeded but the snapshot is gone: {names:?}");
            rig.note("reported-created");
        }
        if !out.crashed {
            assert!(out.op_ok, "snapshot-create: no crash, yet `snapshot create` failed: {}", out.op_out);
        }
        rig.at_rest(&format!("after {plan:?} during snapshot create"));
        r += 1;
    }
}

/// Snapshots a, b with records written before each, so that removing a copies data
/// into b and removing b (whose child is the head) punches what the head hides.
fn two_snapshots(rig: &mut Rig, tag: &str) -> (String, String) {
    let vol = rig.c.volume.clone();
    let mut names = Vec::new();
    for k in ["a", "b"] {
        let w = rig.writer(2);
        std::thread::sleep(Duration::from_millis(300));
        let end = w.stop();
        assert_eq!(end.errors, 0, "{}", end.summary);
        let n = format!("{tag}{k}");
        let o = rig.c.cli(&["snapshot", "create", &n, "-v", &vol]);
        assert!(o.status.success(), "snapshot create {n}: {}", String::from_utf8_lossy(&o.stderr));
        names.push(n);
    }
    (names[0].clone(), names[1].clone())
}

const REMOVE_MERGE_STEPS: &[&str] = &["remove:marked", "remove:copied", "remove:committed", "remove:cleaned"];
const REMOVE_HEAD_STEPS: &[&str] = &["remove:head-synced", "remove:punched"];

#[test]
fn crash_snapshot_remove() {
    let mut rig = Rig::new("snapshot-remove", "crash8");
    let b = Budget::from_env(3);
    let start = rig.rng.below(64);
    let vol = rig.c.volume.clone();
    let mut r = 0;
    while b.more(r) {
        // Keep the chain short over a long campaign: what is left of earlier rounds goes.
        for s in snapshot_names(&rig) {
            let o = rig.c.cli(&["snapshot", "rm", &s, "-v", &vol]);
            assert!(o.status.success(), "snapshot rm {s}: {}", String::from_utf8_lossy(&o.stderr));
        }
        let (a, bsnap) = two_snapshots(&mut rig, &format!("r{r}"));
        let mut steps: Vec<&'static str> = REMOVE_MERGE_STEPS.to_vec();
        steps.extend(REMOVE_HEAD_STEPS);
        let plan = plan_for(&mut rig.rng, r, start, &steps, &[], 40);
        // The head's own steps happen only when the removed snapshot's child is the head.
        let victim = match &plan {
            Plan::ReplicaFault(_, s) if REMOVE_HEAD_STEPS.contains(s) => bsnap.clone(),
            Plan::ReplicaFault(..) => a.clone(),
            _ => if rig.rng.below(2) == 0 { a.clone() } else { bsnap.clone() },
        };
        let out = rig.op_round(&plan, &mut |rig| rig.cli_bg(&["snapshot", "rm", &victim, "-v", &vol], &[]));
        if !out.crashed {
            assert!(out.op_ok, "snapshot-remove: no crash, yet `snapshot rm` failed: {}", out.op_out);
        }
        let listed = rig.snapshots();
        let still = listed.iter().find(|s| s["name"] == victim.as_str());
        if out.op_ok {
            assert!(still.is_none_or(|s| s["removed"] == true), "snapshot-remove ({plan:?}): `snapshot rm {victim}` succeeded but it is still there: {listed:?}");
        }
        // Done again after the crash, the removal finishes (or was done).
        let o = rig.c.cli(&["snapshot", "rm", &victim, "-v", &vol]);
        let msg = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success() || msg.contains("no snapshot named"), "snapshot-remove ({plan:?}): retrying `snapshot rm {victim}`: {msg}");
        rig.at_rest(&format!("after {plan:?} during snapshot rm {victim}"));
        r += 1;
    }
}

const REBUILD_TARGET_STEPS: &[&str] = &["rebuild:pulled", "rebuild:replayed", "rebuild:committed", "rebuild:cleaned"];
const REBUILD_ENGINE_STEPS: &[&str] = &["rebuild:engine-attached", "rebuild:engine-synced"];

/// A replica dies and comes back; while it is rebuilt the target, its source, the
/// engine or everything is killed at a random instant, or one of them aborts at a fault
/// point of the rebuild's completion (target side: copied, held writes replayed,
/// `Rebuilding:false` committed, cleaned up; source: its first read; engine: attached
/// WO, told the copy is done).
#[test]
fn crash_rebuild() {
    let mut rig = Rig::new("rebuild", "crash9");
    let b = Budget::from_env(4);
    let start = rig.rng.below(64);
    let vol = rig.c.volume.clone();
    let kinds = REBUILD_TARGET_STEPS.len() + 1 + REBUILD_ENGINE_STEPS.len() + 4;
    let mut r = 0;
    while b.more(r) {
        let t = rig.rng.below(3) as usize;
        let others: Vec<usize> = (0..3).filter(|&i| i != t).collect();
        let k = (start + r) as usize % kinds;
        let nt = REBUILD_TARGET_STEPS.len();
        // Victim::Replica(9) stands for "the rebuild's source", known once it starts.
        let plan = if k < nt {
            Plan::ReplicaFault(vec![t], REBUILD_TARGET_STEPS[k])
        } else if k == nt {
            // The source is the engine's first RW replica: after the clean restart, the
            // first of the others in slot order.
            Plan::ReplicaFault(vec![others[0]], "rebuild:file-read")
        } else if k < nt + 1 + REBUILD_ENGINE_STEPS.len() {
            Plan::EngineFault(REBUILD_ENGINE_STEPS[k - nt - 1])
        } else {
            let v = [Victim::Replica(t), Victim::Replica(9), Victim::Engine, Victim::All][k - nt - 1 - REBUILD_ENGINE_STEPS.len()];
            Plan::Random(v, 300)
        };
        rig.arm(&plan);
        let target_env = match &plan {
            Plan::ReplicaFault(w, s) if w == &vec![t] => crash_at(s),
            _ => Vec::new(),
        };
        let seed = rig.rng.below(1 << 30);
        rig.fio_fill(seed);
        let mut w = rig.writer(2);
        w.wait_warm();
        // The failure that calls for a rebuild; the replica comes back with its directory.
        rig.kill(Victim::Replica(t));
        rig.restart_replica(t, &target_env);
        let source = rig.replica_ls().iter().find(|x| x["mode"] == "RW").and_then(|x| x["address"].as_str()).map(|s| s.to_string());
        let source = source.and_then(|a| rig.c.replicas.iter().position(|x| x.addr == a)).expect("a RW source");
        let plan = match plan {
            Plan::Random(Victim::Replica(9), ms) => Plan::Random(Victim::Replica(source), ms),
            p => p,
        };
        let addr = rig.c.replicas[t].addr.clone();
        let add = rig.cli_bg(&["replica", "add", &addr, "-v", &vol], &[]);
        let (added, add_out) = wait_child(add, Duration::from_secs(60));
        // The rebuild is over when the target is RW or ERR, or the engine is gone.
        let mut over = |rig: &mut Rig| {
            let ls = rig.replica_ls();
            ls.is_empty() || ls.iter().any(|x| x["address"] == addr.as_str() && (x["mode"] == "RW" || x["mode"] == "ERR"))
        };
        let crashed = match plan {
            Plan::Random(v, ms) => {
                std::thread::sleep(rig.rng.ms(0, ms));
                // Whether the kill lands in the copy or after it, for the report.
                let ls = rig.replica_ls();
                let wo = ls.iter().any(|x| x["address"] == addr.as_str() && x["mode"] == "WO");
                rig.note(if wo { "killed-while-copying" } else { "killed-after-copy" });
                rig.kill(v);
                true
            }
            _ => rig.crash(&plan, &mut over),
        };
        eprintln!("[crash] rebuild round {r}: target r{t} source r{source} {plan:?} crashed={crashed} added={added}");
        if !crashed {
            assert!(added, "rebuild: no crash, yet `replica add` failed: {add_out}");
        }
        rig.settle(w, Some(seed), &format!("{plan:?} during a rebuild"));
        rig.at_rest(&format!("after {plan:?} during a rebuild"));
        // System snapshots of the rebuilds pile up otherwise.
        let o = rig.c.cli(&["snapshot", "purge", "-v", &vol]);
        assert!(o.status.success(), "snapshot purge: {}", String::from_utf8_lossy(&o.stderr));
        r += 1;
    }
}

const BACKUP_ENGINE_STEPS: &[&str] = &["backup:cfg-started", "backup:uploaded", "backup:cfg-committed", "backup:volume-cfg"];

/// `longhorn ARGS` with the rig's run dir and its backup settings file.
fn bk(rig: &Rig, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .env("LONGHORN_RUN_DIR", rig.c.run_dir())
        .env("LONGHORN_SETTINGS", rig.c.path("settings.json"))
        .output()
        .expect("run longhorn")
}

fn bk_ok(rig: &Rig, args: &[&str]) -> String {
    let o = bk(rig, args);
    assert!(o.status.success(), "longhorn {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn backup_rig(scenario: &str, volume: &str) -> Rig {
    let rig = Rig::new(scenario, volume);
    bk_ok(&rig, &["backup", "target", &format!("file://{}", rig.c.path("store").display())]);
    rig
}

/// The backups of the rig's volume in the store: (name, snapshot, state).
fn backups(rig: &Rig) -> Vec<(String, String, String)> {
    let out = bk_ok(rig, &["backup", "ls", &rig.c.volume, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("backup ls json");
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let f = |k: &str| b[k].as_str().unwrap_or("").to_string();
                    (f("name"), f("snapshot"), f("state"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A hash of the volume in restored replica directory `dir`, which must open.
fn restored_view(dir: &std::path::Path, volume: &str, size: u64) -> u64 {
    use std::hash::Hasher;
    let s = longhorn_replica::Store::open(dir, Some(volume)).unwrap_or_else(|e| panic!("restored {} does not open: {e}", dir.display()));
    s.close().expect("close");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&read_layers(&head_chain(dir), size));
    h.finish()
}

/// Restores backup `name` as `to` with `replicas` replicas; each must read as `want`.
fn restore_and_compare(rig: &Rig, name: &str, to: &str, replicas: usize, want: u64) {
    let data = rig.c.path("restored");
    bk_ok(rig, &["backup", "restore", name, "-v", &rig.c.volume, "--to", to, "--data-dir", data.to_str().expect("utf8"), "--replicas", &replicas.to_string()]);
    for i in 0..replicas {
        let got = restored_view(&data.join(to).join(format!("replica-{i}")), to, rig.size());
        assert_eq!(got, want, "backup {name} restored as {to}: replica-{i} does not read as its snapshot did");
    }
    std::fs::remove_dir_all(data.join(to)).expect("remove the restored volume");
}

/// A backup of a fresh snapshot while the engine is killed at a random instant, aborts
/// at a step of the backup's commit, or the replica it reads from is killed. After the
/// restart: every complete backup restores to exactly its snapshot, an incomplete one
/// is refused, a backup reported complete is complete, and a new backup works.
#[test]
fn crash_backup() {
    let mut rig = backup_rig("backup", "crash10");
    let b = Budget::from_env(4);
    let start = rig.rng.below(64);
    let vol = rig.c.volume.clone();
    let mut expected: std::collections::HashMap<String, u64> = Default::default();
    let mut verified: std::collections::HashSet<String> = Default::default();
    // Backups left incomplete by a crash: listed as such, and refused for a restore.
    let mut incomplete: std::collections::HashSet<String> = Default::default();
    let kinds = BACKUP_ENGINE_STEPS.len() + 3;
    let mut r = 0;
    while b.more(r) {
        let k = (start + r) as usize % kinds;
        let plan = if k < BACKUP_ENGINE_STEPS.len() {
            Plan::EngineFault(BACKUP_ENGINE_STEPS[k])
        } else {
            // The backup reads from the engine's first RW replica: r0 after a clean start.
            Plan::Random([Victim::Engine, Victim::Replica(0), Victim::All][k - BACKUP_ENGINE_STEPS.len()], 250)
        };
        // Old backup snapshots go (their backups stay in the store).
        let snaps = snapshot_names(&rig);
        for s in snaps.iter().take(snaps.len().saturating_sub(2)) {
            rig.c.cli(&["snapshot", "rm", s, "-v", &vol]);
        }
        let snap = format!("b{r}");
        let mut reported = false;
        let out = rig.op_round(&plan, &mut |rig| {
            let o = rig.c.cli(&["snapshot", "create", &snap, "-v", &vol]);
            assert!(o.status.success(), "snapshot create {snap}: {}", String::from_utf8_lossy(&o.stderr));
            expected.insert(snap.clone(), view_of(&rig.c.replicas[1].dir, &snap, rig.size()));
            let env = vec![("LONGHORN_SETTINGS".to_string(), rig.c.path("settings.json").display().to_string())];
            rig.cli_bg(&["backup", "create", "-v", &vol, "--snapshot", &snap], &env)
        });
        reported |= out.op_ok;
        if !out.crashed {
            assert!(out.op_ok, "backup: no crash, yet `backup create` failed: {}", out.op_out);
        }
        let list = backups(&rig);
        if reported {
            assert!(list.iter().any(|(_, s, st)| s == &snap && st == "complete"), "backup ({plan:?}): the backup of {snap} was reported complete but is not: {list:?}");
        }
        for (name, s, state) in &list {
            if state == "complete" && !verified.contains(name) {
                let want = *expected.get(s).expect("a snapshot this test backed up");
                restore_and_compare(&rig, name, &format!("v{}", verified.len()), 1, want);
                verified.insert(name.clone());
            } else if state != "complete" {
                let o = bk(&rig, &["backup", "restore", name, "-v", &vol, "--to", "never", "--data-dir", rig.c.path("restored").to_str().expect("utf8")]);
                assert!(!o.status.success(), "an incomplete backup {name} was restored");
                incomplete.insert(name.clone());
            }
        }
        rig.stats.extra.insert("backups-verified".into(), verified.len() as u64);
        rig.stats.extra.insert("incomplete-refused".into(), incomplete.len() as u64);
        rig.at_rest(&format!("after {plan:?} during a backup"));
        r += 1;
    }
    // The store takes a new backup after all that (a lock left by a killed engine may
    // make it wait until that lock expires), and --latest restores a complete one.
    let snap = "final";
    assert!(rig.c.cli(&["snapshot", "create", snap, "-v", &vol]).status.success());
    let want = view_of(&rig.c.replicas[0].dir, snap, rig.size());
    bk_ok(&rig, &["backup", "create", "-v", &vol, "--snapshot", snap]);
    let data = rig.c.path("restored");
    bk_ok(&rig, &["backup", "restore", "--latest", "-v", &vol, "--to", "latest", "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    assert_eq!(restored_view(&data.join("latest/replica-0"), "latest", rig.size()), want, "--latest is the last backup taken");
}

/// A restore is killed at a random instant, or aborts just before or just after its
/// rename into place, run by `backup restore` or by `up --from-backup`. Afterwards the
/// volume is either not there (and the restore, done again, works) or complete; never
/// a partial volume anyone could serve.
#[test]
fn crash_restore() {
    let mut rig = backup_rig("restore", "crash11");
    let vol = rig.c.volume.clone();
    let w = rig.writer(4);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(w.stop().errors, 0);
    assert!(rig.c.cli(&["snapshot", "create", "s", "-v", &vol]).status.success());
    let want = view_of(&rig.c.replicas[0].dir, "s", rig.size());
    bk_ok(&rig, &["backup", "create", "-v", &vol, "--snapshot", "s"]);
    let name = backups(&rig).into_iter().find(|b| b.1 == "s").expect("the backup").0;
    let url = format!("file://{}?backup={name}&volume={vol}", rig.c.path("store").display());
    let data = rig.c.path("restored");
    let settings = ("LONGHORN_SETTINGS".to_string(), rig.c.path("settings.json").display().to_string());
    let b = Budget::from_env(4);
    let start = rig.rng.below(64);
    let mut r = 0;
    while b.more(r) {
        let to = format!("r{r}");
        let via_up = rig.rng.below(2) == 0;
        let k = (start + r) % 3;
        let mut env = vec![settings.clone()];
        match k {
            0 => env.extend(crash_at("restore:written")),
            1 => env.extend(crash_at("restore:renamed")),
            _ => {}
        }
        let d = data.to_str().expect("utf8").to_string();
        let nbd = rig.c.path(&format!("{to}.nbd"));
        let run = rig.c.path(&format!("run-{to}"));
        let up_args = |to: &str| -> Vec<String> {
            ["up", to, "--size", "64M", "--replicas", "2", "--from-backup", &url, "--data-dir", &d, "--frontend", "none", "--nbd"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("unix:{}", nbd.display()), "--run-dir".into(), run.display().to_string()])
                .collect()
        };
        let args: Vec<String> = if via_up {
            up_args(&to)
        } else {
            ["backup", "restore", &name, "-v", &vol, "--to", &to, "--data-dir", &d, "--replicas", "2"].iter().map(|s| s.to_string()).collect()
        };
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut child = rig.cli_bg(&a, &env);
        if k == 2 {
            std::thread::sleep(rig.rng.ms(0, 150));
            let _ = child.kill();
        }
        // The fault point aborts the process; a timeout here would mean it never got there.
        let t = std::time::Instant::now();
        while matches!(child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        rig.stats.kills += 1;
        rig.stats.processes_killed += 1;
        let dest = data.join(&to);
        let existed = dest.exists();
        rig.note(if existed { "restored-before-crash" } else { "absent-after-crash" });
        if existed {
            for i in 0..2 {
                assert_eq!(restored_view(&dest.join(format!("replica-{i}")), &to, rig.size()), want, "restore ({k}): {} exists after the crash but is not the backup", dest.display());
            }
        }
        if via_up {
            // up again, without the fault: it restores if needed and serves the backup.
            let up_log = rig.c.path(&format!("up-{to}.log"));
            let ua = up_args(&to);
            let ua: Vec<&str> = ua.iter().map(|s| s.as_str()).collect();
            let envs = vec![settings.clone()];
            let (mut up, _) = spawn_env(&ua, &up_log, "  NBD:", &envs).expect("up --from-backup serves after the crash");
            let img = rig.c.path(&format!("{to}.raw"));
            sh(&format!("nbdcopy -- 'nbd+unix:///?socket={}' '{}'", nbd.display(), img.display()));
            use std::hash::Hasher;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(&std::fs::read(&img).expect("image"));
            assert_eq!(h.finish(), want, "restore ({k}): up --from-backup serves something else than the backup");
            assert!(up.term(), "up stops cleanly");
        } else if !existed {
            bk_ok(&rig, &["backup", "restore", &name, "-v", &vol, "--to", &to, "--data-dir", &d, "--replicas", "2"]);
            for i in 0..2 {
                assert_eq!(restored_view(&dest.join(format!("replica-{i}")), &to, rig.size()), want, "restore ({k}): done again, {} is not the backup", dest.display());
            }
        }
        let leftover = data.join(format!(".{to}.restoring"));
        if leftover.exists() {
            rig.note("restoring-dir-left");
        }
        rig.stats.rounds += 1;
        r += 1;
    }
    // The records written before the backup, in a restored volume.
    let dir = data.join("r0/replica-0");
    let img = read_layers(&head_chain(&dir), rig.size());
    rig.check_records(&img, "in the restored volume");
}

/// Unmounts (lazily: a dead device cannot be flushed) whatever is mounted on `mnt`.
fn umount_lazy(mnt: &std::path::Path) {
    let _ = sh_try(&format!("umount -l '{}' 2>/dev/null", mnt.display()));
}

/// The loop devices backed by the FUSE file of `volume` (a killed engine leaves its one).
fn loops_of(volume: &str) -> Vec<String> {
    let out = sh("losetup -l -n -O NAME,BACK-FILE || true");
    out.lines()
        .filter(|l| l.contains(&format!("/{volume}.fuse/{volume}")))
        .filter_map(|l| l.split_whitespace().next().map(|s| s.to_string()))
        .collect()
}

fn sha(f: &std::path::Path) -> String {
    sh(&format!("sha256sum '{}'", f.display())).split_whitespace().next().unwrap_or("").to_string()
}

/// `e2fsck -fn` must find nothing to fix.
fn fsck_clean(dev: &std::path::Path, when: &str) {
    let (ok, out) = sh_try(&format!("e2fsck -fn '{}'", dev.display()));
    assert!(ok, "ext4 ({when}): e2fsck -fn reports problems:\n{out}");
}

/// ext4 on /dev/longhorn/VOL (FUSE + loop): files written and fsynced (file and
/// directory) with fio running in the filesystem meanwhile, and a replica, the engine
/// or everything killed at a random instant. After the restart, the journal is
/// replayed by a mount, `e2fsck -fn` is clean, and every fsynced file reads back.
#[test]
fn crash_ext4() {
    for t in ["mkfs.ext4", "e2fsck", "mount", "losetup"] {
        assert!(have(t), "{t} is not installed");
    }
    let vol = "lhcrash-ext4";
    let mut c = Cluster::without_engine(vol, 128 * MB, 3);
    c.engine_extra = vec!["--frontend".into(), "fuse".into()];
    c.start_engine();
    // Dropped after the rig (declared before it): what the last engine, killed at the
    // end, leaves behind (its FUSE mount and the loop device on it) goes too.
    struct Leftovers(std::path::PathBuf, &'static str);
    impl Drop for Leftovers {
        fn drop(&mut self) {
            // Loops first: they are found by their backing file's path, which the
            // unmount takes away.
            for l in loops_of(self.1) {
                let _ = sh_try(&format!("losetup -d '{l}'"));
            }
            umount_lazy(&self.0);
        }
    }
    let _leftovers = Leftovers(c.run_dir().join(format!("{vol}.fuse")), vol);
    let mut rig = Rig::on(c, "ext4");
    let dev = std::path::PathBuf::from("/dev/longhorn").join(vol);
    assert!(dev.exists(), "{} after the engine started:\n{}", dev.display(), rig.c.engine_log());
    sh(&format!("mkfs.ext4 -q -F '{}'", dev.display()));
    let mnt = rig.c.path("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            umount_lazy(&self.0);
        }
    }
    let _guard = Unmount(mnt.clone());
    let mount = || sh(&format!("mount '{}' '{}'", dev.display(), mnt.display()));
    mount();
    let mut durable: Vec<(std::path::PathBuf, String)> = Vec::new();
    let b = Budget::from_env(3);
    let mut r = 0;
    while b.more(r) {
        let one = Victim::Replica(rig.rng.below(3) as usize);
        let victim = *rig.rng.pick(&[one, Victim::Engine, Victim::All]);
        let dir = mnt.join(format!("round{r}"));
        std::fs::create_dir_all(&dir).expect("round dir");
        let fio_dir = mnt.join("fio");
        std::fs::create_dir_all(&fio_dir).expect("fio dir");
        let job = format!(
            "--name=fs --directory='{}' --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=24M \
             --verify=crc32c --verify_fatal=1 --do_verify=1 --fsync=32 --rate_iops=3000",
            fio_dir.display()
        );
        let fio_t = std::thread::spawn(move || fio(&job));
        // Files made durable one by one (file fsync, then the directory's), while fio runs.
        let writer_dir = dir.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let files_t = std::thread::spawn(move || {
            let mut made = Vec::new();
            for i in 0..200 {
                if stop2.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let f = writer_dir.join(format!("f{i}"));
                let (ok, _) = sh_try(&format!(
                    "head -c $(( (RANDOM % 256 + 1) * 1024 + 17 )) /dev/urandom > '{0}' && sync '{0}' && sync '{1}'",
                    f.display(),
                    writer_dir.display()
                ));
                if !ok {
                    break;
                }
                made.push(f);
            }
            made
        });
        std::thread::sleep(rig.rng.ms(300, 1200));
        rig.kill(victim);
        stop.store(true, std::sync::atomic::Ordering::Release);
        let made = files_t.join().expect("file writer");
        let (fio_ok, fio_errs, fio_out) = fio_t.join().expect("fio");
        let replicas_only = matches!(victim, Victim::Replica(_));
        // Durable: every file whose fsyncs returned; the last one may have been cut short.
        for f in &made {
            durable.push((f.clone(), sha(f)));
        }
        if replicas_only {
            assert!(fio_ok && fio_errs == 0, "ext4: fio in the filesystem failed across the kill of {victim:?}:\n{fio_out}");
            rig.stats.fio_verified += 1;
            rig.heal();
            sh(&format!("umount '{}'", mnt.display()));
        } else {
            // The filesystem died with its engine: detach it as an operator would.
            umount_lazy(&mnt);
            for l in loops_of(vol) {
                let _ = sh_try(&format!("losetup -d {l}"));
            }
            rig.heal();
            assert!(dev.exists(), "{} after the engine came back", dev.display());
            // Replaying the journal is what any mount does first.
            mount();
            sh(&format!("umount '{}'", mnt.display()));
        }
        fsck_clean(&dev, &format!("after {victim:?} was killed"));
        mount();
        for (f, want) in &durable {
            assert!(f.exists(), "ext4 ({victim:?}): fsynced file {} is gone", f.display());
            assert_eq!(&sha(f), want, "ext4 ({victim:?}): fsynced file {} changed", f.display());
        }
        rig.stats.writes_checked = durable.len() as u64;
        sh(&format!("umount '{}'", mnt.display()));
        rig.at_rest(&format!("after {victim:?} was killed under ext4"));
        mount();
        r += 1;
    }
    sh(&format!("umount '{}'", mnt.display()));
    fsck_clean(&dev, "at the end");
}

/// An engine with `--frontend fuse` killed with SIGKILL leaves a dead FUSE mount
/// (ENOTCONN) in its run dir; the next engine must clear it and start, also when the run
/// dir is given by a path that is not canonical (here it has a `..`: the tests' root).
#[test]
fn fuse_engine_starts_again_after_sigkill() {
    let vol = "lhcrash-fuse";
    let mut c = Cluster::without_engine(vol, 32 * MB, 1);
    c.engine_extra = vec!["--frontend".into(), "fuse".into()];
    c.start_engine();
    let dev = std::path::PathBuf::from("/dev/longhorn").join(vol);
    assert!(dev.exists(), "{}", c.engine_log());
    c.engine.take().expect("engine").proc.kill9();
    for l in loops_of(vol) {
        let _ = sh_try(&format!("losetup -d {l}"));
    }
    let args = c.engine_args();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = spawn(&a, &c.path("engine-again.log"), "ready");
    let (mut p, _) = r.unwrap_or_else(|e| panic!("the engine does not start after a SIGKILL: {e}"));
    assert!(dev.exists(), "{} after the restart", dev.display());
    assert!(p.term(), "the engine stops cleanly");
}

/// Two clients' writes are in flight on two connections when every process dies. Each
/// replica had applied one of them and not the other (made certain here with
/// LONGHORN_SLOW_WRITE: r0 and r2 are slow to write block X, r1 block Y), so all three
/// have the same revision counter although they differ in X and Y. Neither write was
/// acknowledged, so either content is allowed, but one: reads of X must not change from
/// one read to the next (they go round-robin to the replicas), and the replicas the
/// engine uses must be identical. The engine that starts next serves one of the
/// replicas the dead engine left unsettled, and the others are rebuilt from it.
#[test]
fn replicas_agree_after_a_crash_with_writes_in_flight_on_two_connections() {
    let (x, y) = (1 * MB, 2 * MB);
    let mut c = Cluster::without_engine("crash12", 16 * MB, 0);
    for (i, off) in [x, y, x].iter().enumerate() {
        c.add_replica_env(&format!("r{i}"), &[("LONGHORN_SLOW_WRITE".into(), format!("{off}:3000"))]);
    }
    c.start_engine();
    let mut rig = Rig::on(c, "in-flight-divergence");
    let uri = rig.c.uri();
    // Both writes sent, FUA, on two connections; neither waits for its reply.
    let script = format!(
        "import nbd, time\na = nbd.NBD(); a.connect_uri({uri:?})\nb = nbd.NBD(); b.connect_uri({uri:?})\n\
         a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b'X' * 4096)), {x}, flags=nbd.CMD_FLAG_FUA)\n\
         b.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b'Y' * 4096)), {y}, flags=nbd.CMD_FLAG_FUA)\n\
         a.poll(0); b.poll(0)\nprint('sent', flush=True)\ntime.sleep(30)\n"
    );
    let mut client = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(client.stdout.take().expect("stdout")), &mut line).expect("read");
    assert_eq!(line.trim(), "sent");
    // Each replica applies the write that is not slow for it.
    std::thread::sleep(Duration::from_millis(500));
    rig.kill(Victim::All);
    let _ = client.kill();
    let _ = client.wait();
    rig.heal();
    let ls = rig.replica_ls();
    eprintln!("after the restart: {ls:?}");
    // Six reads of X through one connection: round-robin over the RW replicas.
    let out = sh(&format!(
        "{NBDSH} -u '{uri}' -c 'print(\",\".join(h.pread(4096, {x})[:1].hex() for _ in range(6)))'",
        uri = rig.c.uri()
    ));
    let reads: std::collections::BTreeSet<&str> = out.trim().split(',').collect();
    rig.stop_all_cleanly();
    let views: Vec<Vec<u8>> = rig.c.replicas.iter().map(|r| read_layers(&head_chain(&r.dir), rig.size())).collect();
    let differ = views.iter().any(|v| v != &views[0]);
    assert!(reads.len() == 1, "block X read back differently from one read to the next: first bytes {reads:?} (replicas differ: {differ})");
    assert!(!differ, "the replicas the engine used differ");
}

/// The other side of the rule above: an engine that dies while the volume is idle
/// leaves replicas it had settled (SETTLE once nothing was in flight), and the next
/// engine serves all of them at once, with nothing to rebuild.
#[test]
fn an_engine_killed_while_idle_leaves_replicas_that_need_no_rebuild() {
    let mut c = Cluster::new("crash14", 16 * MB, 3);
    sh(&format!(
        "{NBDSH} -u '{}' -c 'h.pwrite(b\"A\" * 65536, 0); h.pwrite(b\"B\" * 4096, 1048576); h.flush()'",
        c.uri()
    ));
    let ls = |c: &Cluster| -> Vec<serde_json::Value> {
        let o = c.cli(&["replica", "ls", "-v", &c.volume, "--json"]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    };
    let t = std::time::Instant::now();
    loop {
        let l = ls(&c);
        if l.len() == 3 && l.iter().all(|r| r["unsettled"] == false) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the idle engine did not settle its replicas: {l:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(mut e) = c.engine.take() {
        e.proc.kill9();
    }
    c.start_engine();
    let l = ls(&c);
    assert!(l.iter().all(|r| r["mode"] == "RW"), "replicas after the restart: {l:?}\n{}", c.engine_log());
    let out = sh(&format!("{NBDSH} -u '{}' -c 'print(h.pread(4096, 1048576)[:1].decode())'", c.uri()));
    assert_eq!(out.trim(), "B");
}

/// The engine dies in the middle of a snapshot's commit: two replicas committed the
/// new chain, the third had not (it is held at `snapshot:synced` here, as a slow disk
/// would hold it), and `longhorn up` stops the rest. All three have the same revision
/// (no write happens during the commit's I/O pause). The next engine must not serve
/// from replicas whose chains differ: one chain is kept and the others are rebuilt.
#[test]
fn replicas_agree_on_snapshots_after_a_crash_during_the_commit() {
    let mut c = Cluster::without_engine("crash13", 16 * MB, 0);
    c.add_replica("r0");
    c.add_replica_env("r1", &[("LONGHORN_STALL_AT".into(), "snapshot:synced".into())]);
    c.add_replica("r2");
    c.start_engine();
    let mut rig = Rig::on(c, "snapshot-commit-divergence");
    let w = rig.writer(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.stop().errors, 0);
    let vol = rig.c.volume.clone();
    let snap = rig.cli_bg(&["snapshot", "create", "s", "-v", &vol], &[]);
    let committed = |d: &std::path::Path| std::fs::read_to_string(d.join("volume.meta")).is_ok_and(|m| m.contains("volume-snap-s.img"));
    let t = std::time::Instant::now();
    while !(committed(&rig.c.replicas[0].dir) && committed(&rig.c.replicas[2].dir)) {
        assert!(t.elapsed() < Duration::from_secs(3), "r0 and r2 did not commit the snapshot");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!committed(&rig.c.replicas[1].dir), "r1 is held before its commit");
    rig.kill(Victim::All);
    let _ = wait_child(snap, Duration::from_secs(10));
    for i in 0..3 {
        rig.restart_replica(i, &[]);
    }
    rig.start_engine(&[]);
    let ls = rig.replica_ls();
    let snaps = |r: &serde_json::Value| -> Vec<String> {
        r["chain"].as_array().map(|a| a.iter().filter_map(|n| n.as_str()).filter(|n| n.starts_with("volume-snap-")).map(|s| s.to_string()).collect()).unwrap_or_default()
    };
    let rw: Vec<&serde_json::Value> = ls.iter().filter(|r| r["mode"] == "RW").collect();
    assert!(!rw.is_empty(), "{ls:?}");
    for r in &rw {
        assert_eq!(snaps(r), snaps(rw[0]), "the engine serves from replicas whose snapshots differ: {ls:?}");
    }
    rig.heal();
    rig.at_rest("after the engine died during a snapshot commit");
}

/// A replica failed and came back (not rebuilt yet) while the others took acknowledged
/// writes; then the engine hangs, or is killed while the others are busy with a long
/// request of its own (a merge), and a new engine is started on the same three
/// replicas. The two good ones still belong to the old engine and refuse the new one.
/// The new engine must not start on the stale replica alone: it would serve old data
/// and then rebuild the good replicas from it, losing the acknowledged writes for good.
#[test]
fn a_new_engine_does_not_serve_a_stale_replica_while_the_good_ones_are_held() {
    let mut c = Cluster::new("crash14", 16 * MB, 3);
    let put = |uri: &str, byte: u8| sh(&format!("{NBDSH} -u '{uri}' -c 'h.pwrite(b\"\\x{byte:02x}\" * 4096, 0, nbd.CMD_FLAG_FUA)'"));
    put(&c.uri(), 0x01);
    c.replicas[0].proc.kill9();
    put(&c.uri(), 0x02);
    c.restart_replica(0);
    let a = c.engine.take().expect("engine");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(a.proc.pid(), libc::SIGSTOP) };
    // Engine B has its own sockets (A's are still there, as a hung engine's would be).
    let mut args = c.engine_args();
    for (k, v) in [("--nbd", format!("unix:{}", c.path("b.nbd").display())), ("--run-dir", c.path("run-b").display().to_string())] {
        let i = args.iter().position(|a| a == k).expect("option") + 1;
        args[i] = v;
    }
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let b = spawn(&argv, &c.path("engine-b.log"), "ready");
    let read = |uri: &str| sh(&format!("{NBDSH} -u '{uri}' -c 'print(h.pread(4096, 0)[0])'")).trim().to_string();
    let served = b.as_ref().ok().map(|(_, uri)| read(uri));
    // SAFETY: as above.
    unsafe { libc::kill(a.proc.pid(), libc::SIGCONT) };
    drop(b);
    assert_eq!(served, None, "a new engine started on the stale replica alone and read {served:?} (the acknowledged write was 2)");
    // Once the old engine is gone, the new one starts with the good replicas.
    drop(a);
    let (_b, uri) = spawn(&argv, &c.path("engine-b2.log"), "ready").expect("the new engine starts once the old one is gone");
    assert_eq!(read(&uri), "2", "the acknowledged write");
}

/// A replica is down while snapshot A is removed (merged away on the others), comes
/// back with its directory and is rebuilt. Its own A, which the source's chain no longer
/// has, must not stay behind: left as a branch it is a second child of A's parent X,
/// and removing X later merges X away on the others but only marks it on this replica,
/// so the chains differ although every replica said the removal succeeded.
#[test]
fn a_rebuilt_replica_keeps_no_snapshot_the_source_does_not_have() {
    let mut rig = Rig::new("rebuild-orphan", "crash15");
    let vol = rig.c.volume.clone();
    let snap = |rig: &Rig, args: &[&str]| {
        let o = rig.c.cli(args);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    for n in ["x", "a", "b"] {
        let w = rig.writer(2);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(w.stop().errors, 0);
        snap(&rig, &["snapshot", "create", n, "-v", &vol]);
    }
    rig.kill(Victim::Replica(2));
    // Writes make the engine drop the dead replica before the removal.
    let w = rig.writer(2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(w.stop().errors, 0);
    snap(&rig, &["snapshot", "rm", "a", "-v", &vol]);
    rig.heal();
    snap(&rig, &["snapshot", "rm", "x", "-v", &vol]);
    let left: Vec<String> = std::fs::read_dir(&rig.c.replicas[2].dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("volume-snap-a.img") || n.starts_with("volume-snap-x.img"))
        .collect();
    assert!(left.is_empty(), "the rebuilt replica still has {left:?}");
    rig.at_rest("after removals around a rebuild");
}
