//! Who may talk to a replica: only holders of the volume's secret (proven, never sent),
//! rebuild peers only for reading, and one engine at a time.

use longhorn_replica::auth::{Credentials, HandshakeError, Key};
use longhorn_replica::proto::Op;
use longhorn_tests::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn refused_errno(r: Result<ReplicaClient, HandshakeError>) -> (u32, String) {
    match r {
        Err(HandshakeError::Refused { errno, reason }) => (errno, reason),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("the replica accepted the client"),
    }
}

#[test]
fn replicas_accept_only_clients_that_prove_the_volume_secret() {
    let c = Cluster::without_engine("vol1", 16 * MB, 1);
    let addr = c.replicas[0].addr.clone();
    let key = Arc::new(Key::load(&c.secret).expect("secret"));
    let other_file = c.path("other.key");
    let other = Arc::new(Key::generate(&other_file).expect("another secret"));

    let (errno, why) = refused_errno(ReplicaClient::connect_as(&addr, "vol1", 16 * MB, &Credentials::engine(None, "e")));
    assert_eq!(errno, libc::EACCES as u32, "{why}");
    assert!(why.contains("authentication failed"), "{why}");
    let (errno, _) = refused_errno(ReplicaClient::connect_as(&addr, "vol1", 16 * MB, &Credentials::engine(Some(other), "e")));
    assert_eq!(errno, libc::EACCES as u32, "another volume's secret is refused");

    let mut good = ReplicaClient::connect_as(&addr, "vol1", 16 * MB, &Credentials::engine(Some(key.clone()), "e"))
        .expect("the volume's secret is accepted");
    good.write(0, &[1; 4096]);

    // A rebuild peer may read snapshot files, never write or change the chain.
    let mut peer = ReplicaClient::connect_as(&addr, "vol1", 16 * MB, &Credentials::peer(Some(key.clone()))).expect("peer");
    for op in [Op::Write, Op::Flush, Op::Snapshot, Op::RebuildBegin, Op::Close, Op::SetMode] {
        let (st, p) = peer.request(op, 0, 4096, &[0; 4096][..if op == Op::Write { 4096 } else { 0 }]).expect("reply");
        assert_eq!(st, libc::EPERM as u32, "{op:?} by a rebuild peer: {}", String::from_utf8_lossy(&p));
    }
    let (st, _) = peer.request(Op::ChainFiles, 0, 0, &[]).expect("reply");
    assert_eq!(st, 0, "a peer reads the chain");

    // A replica without the secret cannot pass for one of this volume.
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let (mut impostor, iaddr) = serve_replica(&t.path().join("r"), "vol1", 16 * MB, &t.path().join("r.log"), &[]);
    match ReplicaClient::connect_as(&iaddr, "vol1", 16 * MB, &Credentials::engine(Some(key), "e")) {
        Err(HandshakeError::Untrusted(why)) => assert!(why.contains("cannot prove"), "{why}"),
        Err(e) => panic!("unexpected: {e}"),
        Ok(_) => panic!("an engine with a secret talked to a replica without one"),
    }
    impostor.kill9();

    // Without a secret a replica refuses to listen beyond loopback.
    let o = std::process::Command::new(bin())
        .args(["replica", "serve", "--volume", "v", "--size", "1M", "--listen", "0.0.0.0:0", "--dir"])
        .arg(t.path().join("r2"))
        .env_remove("LONGHORN_SECRET_FILE")
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--secret-file"), "{}", String::from_utf8_lossy(&o.stderr));
    // A secret file others can read is refused.
    std::fs::write(c.path("loose.key"), "00".repeat(32)).expect("write");
    let o = std::process::Command::new(bin())
        .args(["replica", "serve", "--volume", "v", "--size", "1M", "--listen", "127.0.0.1:0", "--dir"])
        .arg(t.path().join("r3"))
        .arg("--secret-file")
        .arg(c.path("loose.key"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("chmod 600"), "{}", String::from_utf8_lossy(&o.stderr));
}

fn engine_b(c: &Cluster) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["engine", "serve", "--volume", "vol1", "--size", &c.size.to_string(), "--io-timeout", "4"])
        .arg("--nbd")
        .arg(format!("unix:{}", c.path("b.nbd").display()))
        .arg("--run-dir")
        .arg(c.path("run-b"))
        .env("LONGHORN_SECRET_FILE", &c.secret);
    for r in &c.replicas {
        cmd.args(["--replica", &r.addr]);
    }
    cmd
}

/// Two engines on the same replicas: the second is refused while the first lives; once
/// the first is silent past the lease, the second takes over and the first, when it
/// wakes, can no longer write.
#[test]
fn a_second_engine_is_refused_and_a_stale_one_is_fenced() {
    let c = Cluster::new("vol1", 16 * MB, 2);
    sh(&format!("{NBDSH} -u '{}' -c 'h.pwrite(b\"A\" * 4096, 0); h.flush()'", c.uri()));
    let o = engine_b(&c).stdout(std::process::Stdio::null()).output().expect("run engine B");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a second engine started on replicas in use");
    assert!(err.contains("another engine"), "the refusal says why: {err}");

    // Engine A hangs (a partition, as the replicas see it) past the lease.
    let a_pid = c.engine.as_ref().expect("engine").proc.pid();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(a_pid, libc::SIGSTOP) };
    let t = Instant::now();
    let (b, uri_b) = loop {
        let log = c.path("engine-b.log");
        let args: Vec<String> = engine_b(&c).get_args().map(|a| a.to_string_lossy().to_string()).collect();
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        match spawn_env(&a, &log, "ready", &[c.secret_env()]) {
            Ok(v) => break v,
            Err(_) if t.elapsed() < Duration::from_secs(40) => std::thread::sleep(Duration::from_secs(2)),
            Err(e) => panic!("engine B never took over: {e}"),
        }
    };
    let took = t.elapsed();
    eprintln!("engine B took over {took:?} after engine A fell silent");
    assert!(took >= Duration::from_secs(14), "the lease ended too early ({took:?}): a live engine could lose its replicas");
    sh(&format!("{NBDSH} -u '{uri_b}' -c 'h.pwrite(b\"B\" * 4096, 0); h.flush()'"));

    // Engine A wakes: its writes are refused, and it never overwrites B's data.
    // SAFETY: as above.
    unsafe { libc::kill(a_pid, libc::SIGCONT) };
    let (_, out) = sh_try(&format!(
        "{NBDSH} -u '{}' -c 'import errno\ntry:\n    h.pwrite(b\"X\" * 4096, 0)\n    print(\"ACKED\")\nexcept nbd.Error as e:\n    print(\"ERRNO\", e.errnum)'",
        c.uri()
    ));
    assert!(out.contains(&format!("ERRNO {}", libc::EIO)), "the stale engine's write: {out}");
    let data = sh(&format!("{NBDSH} -u '{uri_b}' -c 'import sys; sys.stdout.write(h.pread(4096, 0).decode())'"));
    assert_eq!(data, "B".repeat(4096), "engine B's data was overwritten by the stale engine");
    drop(b);

    // An engine that dies releases the replicas at once: its connections close.
    let mut c2 = Cluster::new("vol1", 16 * MB, 1);
    c2.engine.as_mut().expect("engine").proc.kill9();
    let t = Instant::now();
    c2.start_engine();
    assert!(t.elapsed() < Duration::from_secs(10), "a restart after kill -9 waited for the lease");
}

/// A killed engine's connections are closed by the kernel at once, but the replica's
/// threads serving them may not have run yet (under load they had not, and the engine
/// restarted right after a crash was refused). A new engine asking then waits for those
/// threads instead of being refused, and takes over only after them: the dead engine's
/// last write (held here mid-request by a slow-write fault point) is applied before the
/// new engine's first request, never after it.
#[test]
fn a_new_engine_takes_over_from_a_dead_one_after_its_last_request() {
    use longhorn_replica::proto::{self, Header};
    use std::io::Write;
    let t = tempfile::tempdir_in(test_root()).expect("tmp");
    let size = 8 * MB;
    let off = MB;
    let slow = vec![("LONGHORN_SLOW_WRITE".to_string(), format!("{off}:1500"))];
    let (mut rp, addr) = serve_replica(&t.path().join("r"), "vol1", size, &t.path().join("r.log"), &slow);
    let mut a = ReplicaClient::connect_as(&addr, "vol1", size, &Credentials::engine(None, "engine-a")).expect("engine A");
    let mut b = Vec::new();
    proto::put_frame(&mut b, Header::request(Op::Write, 7, off, 4096), &[b'A'; 4096]);
    a.s.write_all(&b).expect("send A's write");
    // A's write is now held inside the replica; A dies.
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    let mut e = ReplicaClient::connect_as(&addr, "vol1", size, &Credentials::engine(None, "engine-b"))
        .unwrap_or_else(|e| panic!("engine B refused while engine A is dead: {e}\n{}", rp.log_text()));
    let (st, data) = e.request(Op::Read, off, 4096, &[]).expect("B reads");
    assert_eq!(st, 0);
    assert!(data == vec![b'A'; 4096], "B took over before A's last write was applied: it could land over B's writes");
    rp.kill9();
}

/// Sends one raw request line to the engine's control socket.
fn control_raw(c: &Cluster, line: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let s = std::os::unix::net::UnixStream::connect(c.run_dir().join("vol1.sock")).expect("control socket");
    (&s).write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut out = String::new();
    std::io::BufReader::new(&s).read_line(&mut out).expect("answer");
    serde_json::from_str(&out).expect("json answer")
}

fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir).into_iter().map(|p| p.strip_prefix(dir).expect("under").display().to_string()).collect();
    v.sort();
    v
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// Names that become paths are checked by one rule, whichever way they come in: the
/// CLI, the control socket, a recurring job spec. Nothing is made outside its place.
#[test]
fn hostile_names_are_refused_at_every_entry_point() {
    let c = Cluster::new("vol1", 16 * MB, 1);
    let hostile = ["../escape", "/tmp/abs", "a/b", "..", ".hidden", "-rf", "nul\u{0}x", &"n".repeat(201)];
    let before = tree(c.tmp.path());
    for name in hostile {
        let data = c.path("data");
        let cli: Vec<Vec<String>> = vec![
            vec!["up".into(), name.into(), "--size".into(), "4M".into(), "--data-dir".into(), data.display().to_string(), "--no-auto-rebuild".into()],
            vec!["replica".into(), "serve".into(), "--volume".into(), name.into(), "--size".into(), "4M".into(), "--listen".into(), "127.0.0.1:0".into(), "--dir".into(), c.path("rx").display().to_string()],
            vec!["engine".into(), "serve".into(), "--volume".into(), name.into(), "--size".into(), "4M".into(), "--replica".into(), "127.0.0.1:1".into()],
            vec!["volume".into(), "info".into(), "-v".into(), name.into()],
            vec!["snapshot".into(), "create".into(), name.into(), "-v".into(), "vol1".into()],
            vec!["snapshot".into(), "rm".into(), name.into(), "-v".into(), "vol1".into()],
            vec!["snapshot".into(), "revert".into(), name.into(), "-v".into(), "vol1".into()],
            vec!["backup".into(), "restore".into(), "--latest".into(), "-v".into(), "vol1".into(), "--to".into(), name.into(), "--data-dir".into(), data.display().to_string()],
            vec!["share".into(), name.into()],
        ];
        for args in cli {
            // A NUL cannot be passed on a command line at all; the OS refuses it first.
            if name.contains('\u{0}') {
                continue;
            }
            let o = c.cli(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            assert!(!o.status.success(), "longhorn {args:?} accepted {name:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            // A leading '-' is already refused by the argument parser, as an unknown option.
            assert!(err.contains("name") || name.starts_with('-'), "longhorn {args:?}: the error names the bad name: {err}");
        }
        for req in [
            serde_json::json!({"cmd": "snapshot-create", "name": name}),
            serde_json::json!({"cmd": "snapshot-rm", "name": name}),
            serde_json::json!({"cmd": "snapshot-revert", "name": name}),
            serde_json::json!({"cmd": "job-add", "jobs": [{"name": name, "task": "snapshot", "cron": "* * * * *", "retain": 1}]}),
            serde_json::json!({"cmd": "job-rm", "name": name}),
        ] {
            let r = control_raw(&c, &req.to_string());
            assert_eq!(r["ok"], false, "{req} accepted: {r}");
        }
    }
    assert!(!c.tmp.path().parent().expect("parent").join("escape").exists());
    assert!(!std::path::Path::new("/tmp/abs").exists());
    let after = tree(c.tmp.path());
    let new: Vec<&String> = after.iter().filter(|p| !before.contains(p) && !p.ends_with(".log")).collect();
    assert!(new.is_empty(), "files appeared: {new:?}");
    let snaps: serde_json::Value = serde_json::from_slice(&c.cli(&["snapshot", "ls", "-v", "vol1", "--json"]).stdout).expect("json");
    assert_eq!(snaps.as_array().map(|a| a.len()), Some(1), "only the volume head: {snaps}");
}

/// Control and NBD sockets are root's alone, whatever the umask the engine runs with.
#[test]
fn sockets_are_private_whatever_the_umask() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::without_engine("vol1", 16 * MB, 1);
    let run = c.path("run-private");
    let mut args = c.engine_args();
    let i = args.iter().position(|a| a == "--run-dir").expect("--run-dir");
    args[i + 1] = run.display().to_string();
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("umask 000; exec '{}' {}", bin().display(), quoted.join(" ")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let ready = std::io::BufReader::new(out).lines().map_while(Result::ok).any(|l| l.starts_with("ready"));
    c.engine = Some(Engine { proc: Proc { child, log: c.path("umask.log") }, uri: String::new(), sock: c.path("vol.nbd") });
    assert!(ready, "the engine started under umask 000");
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700, "run directory");
    assert_eq!(mode(&run.join("vol1.sock")), 0o600, "control socket");
    assert_eq!(mode(&c.path("vol.nbd")), 0o600, "NBD socket");
}

/// A replica's directory holds the volume's data in plain image files: it is root's
/// alone (0700), made so at start (a directory left open by an older build is closed
/// when a replica serves it again), so another local user cannot read a byte.
#[test]
fn replica_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::without_engine("vol1", 16 * MB, 1);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let dir = c.replicas[0].dir.clone();
    assert_eq!(mode(&dir), 0o700, "a new replica's directory");
    assert!(std::fs::read_dir(&dir).expect("ls").any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("volume-head-"))));
    // Opened up as an older build left it: the next start closes it again.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    c.restart_replica(0);
    assert_eq!(mode(&dir), 0o700, "a replica directory served again");
    // As a user who is not root: nothing of the volume can be listed or read.
    let head = std::fs::read_dir(&dir)
        .expect("ls")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("volume-head-"))
        .expect("the head image")
        .path();
    // The test's own directory is opened up, and a file there is readable by nobody,
    // so what stops nobody below is the replica directory alone.
    std::fs::set_permissions(c.tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let public = c.path("public.txt");
    std::fs::write(&public, "x").expect("write");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let as_nobody = |p: &std::path::Path| sh_try(&format!("setpriv --reuid=65534 --regid=65534 --clear-groups head -c 1 '{}' 2>&1", p.display()));
    let (ok, out) = as_nobody(&public);
    assert!(ok, "the control: nobody cannot even read {} ({out}); is the test root traversable?", public.display());
    let (ok, out) = as_nobody(&head);
    assert!(!ok && out.contains("Permission denied"), "nobody read the head image: {out}");
}

/// NBD has no authentication: the engine refuses a TCP export beyond loopback.
#[test]
fn an_nbd_export_beyond_loopback_is_refused() {
    let c = Cluster::without_engine("vol1", 16 * MB, 1);
    let mut args = c.engine_args();
    let i = args.iter().position(|a| a == "--nbd").expect("--nbd");
    // 192.0.2.1 (TEST-NET-1) is never bound here: the refusal comes before any bind.
    args[i + 1] = "tcp:192.0.2.1:10809".into();
    let o = std::process::Command::new(bin()).args(&args).output().expect("run engine");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("beyond loopback") && err.contains("--nbd"), "{err}");
}
