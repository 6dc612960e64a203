//! Backups to a real NFSv4 server on loopback: NFS-Ganesha (FSAL VFS, userspace, no
//! kernel nfsd) exports a directory, and the engine speaks NFSv4.1 to it from
//! userspace. The whole story (see backup_common) checks the store's layout in the
//! exported directory, i.e. on the server's side; then the faults: an unreachable
//! server, a missing export path, a server restarted between and during backups.

mod backup_common;

use backup_common::*;
use longhorn_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Ganesha {
    child: Option<std::process::Child>,
    conf: PathBuf,
    log: PathBuf,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

impl Ganesha {
    /// Exports `dir` at the NFSv4 path /backups on 127.0.0.1:PORT, NFSv4 only, and
    /// read-only at /readonly.
    fn start(c: &Cluster, dir: &Path) -> Ganesha {
        assert!(have("ganesha.nfsd"), "ganesha.nfsd is not installed (tests/run installs nfs-ganesha, nfs-ganesha-vfs)");
        std::fs::create_dir_all(dir).expect("mkdir export");
        let dir = dir.canonicalize().expect("export path");
        let port = free_port();
        let run = c.path(&format!("ganesha-{port}"));
        std::fs::create_dir_all(run.join("recovery")).expect("mkdir");
        let conf = run.join("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                r#"NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false; }}
NFSV4 {{ Graceless = true; Minor_Versions = 0, 1; RecoveryBackend = fs; RecoveryRoot = "{rec}"; Allow_Numeric_Owners = true; Only_Numeric_Owners = true; }}
EXPORT {{ Export_Id = 1; Path = "{dir}"; Pseudo = "/backups"; Protocols = 4; Transports = TCP; Access_Type = RW; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
EXPORT {{ Export_Id = 2; Path = "{dir}"; Pseudo = "/readonly"; Protocols = 4; Transports = TCP; Access_Type = RO; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
"#,
                rec = run.join("recovery").display(),
                dir = dir.display()
            ),
        )
        .expect("write ganesha.conf");
        let mut g = Ganesha { child: None, conf, log: run.join("ganesha.log"), port };
        g.up();
        g
    }

    fn up(&mut self) {
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&self.conf)
            .arg("-L")
            .arg(&self.log)
            .arg("-p")
            .arg(self.conf.with_extension("pid"))
            .args(["-N", "NIV_EVENT"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ganesha.nfsd");
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "ganesha did not start: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut ch) = self.child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }

    fn target(&self) -> String {
        format!("nfs://127.0.0.1:/backups?nfsOptions=port={},soft,timeo=150", self.port)
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn backup_story_on_nfs_target() {
    let mut c = Cluster::new("vol1", 128 * MB, 2);
    let export = c.path("nfs-export");
    let g = Ganesha::start(&c, &export);
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &g.target()]);
    assert_eq!(env.ok(&c, &["backup", "target"]).trim(), g.target());
    // The objects are checked where the server keeps them.
    story(&mut c, &env, &Dir(export), "nfs");
}

#[test]
fn backup_nfs_faults() {
    let c = Cluster::new("vol3", 64 * MB, 1);
    let env = Env { settings: c.path("settings.json"), vars: vec![] };

    // Bad URLs are refused when set.
    assert!(env.err(&c, &["backup", "target", "nfs://127.0.0.1:2049:/x"]).contains("nfsOptions=port"));
    assert!(env.err(&c, &["backup", "target", "nfs://127.0.0.1:/x?nfsOptions=vers=3"]).contains("NFSv4"));

    // Nothing listens: the backup fails fast naming the target, and no snapshot is left.
    let dead = format!("nfs://127.0.0.1:/backups?nfsOptions=port={}", free_port());
    env.ok(&c, &["backup", "target", &dead]);
    let before = env.ok(&c, &["snapshot", "ls", "-v", "vol3"]);
    let t = Instant::now();
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains(&dead), "{e}");
    assert!(t.elapsed() < Duration::from_secs(90), "took {:?}", t.elapsed());
    assert!(env.err(&c, &["backup", "ls"]).contains(&dead));
    assert_eq!(env.ok(&c, &["snapshot", "ls", "-v", "vol3"]), before);

    // A path the server does not export.
    let export = c.path("nfs-export");
    let mut g = Ganesha::start(&c, &export);
    let missing = format!("nfs://127.0.0.1:/nope?nfsOptions=port={}", g.port);
    env.ok(&c, &["backup", "target", &missing]);
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains(&missing), "{e}");

    // A read-only export: refused before anything is written, naming the target.
    let ro = format!("nfs://127.0.0.1:/readonly?nfsOptions=port={}", g.port);
    env.ok(&c, &["backup", "target", &ro]);
    let e = env.err(&c, &["backup", "create", "-v", "vol3"]);
    assert!(e.contains(&ro) && (e.contains("read-only") || e.contains("permission") || e.contains("access")), "{e}");
    eprintln!("[nfs] read-only export: {}", e.lines().last().unwrap_or(""));
    assert_eq!(env.ok(&c, &["snapshot", "ls", "-v", "vol3"]), before);

    // A server restarted between backups: the next backup mounts afresh and works.
    env.ok(&c, &["backup", "target", &g.target()]);
    qemu_io(&c.uri(), &["write -P 5 0 4M"]);
    env.ok(&c, &["backup", "create", "-v", "vol3"]);
    g.kill();
    g.up();
    qemu_io(&c.uri(), &["write -P 6 8M 4M"]);
    env.ok(&c, &["backup", "create", "-v", "vol3"]);

    // A server killed during a backup and back a moment later: the backup finishes
    // over a new connection or fails saying so; either way the latest complete backup
    // restores to what it held.
    // Random data: every 2 MiB block is new, so the backup has 64 MiB to send.
    let now = c.path("now.raw");
    random_file(&now, 64 * MB);
    sh(&format!("nbdcopy '{}' '{}'", now.display(), c.uri()));
    let env2 = Env { settings: env.settings.clone(), vars: vec![] };
    let run_dir = c.run_dir();
    let settings = env.settings.clone();
    let backup = std::thread::spawn(move || {
        Command::new(bin())
            .args(["backup", "create", "-v", "vol3", "--compression", "none", "--json"])
            .env("LONGHORN_RUN_DIR", run_dir)
            .env("LONGHORN_SETTINGS", settings)
            .output()
            .expect("run longhorn")
    });
    std::thread::sleep(Duration::from_millis(150));
    g.kill();
    std::thread::sleep(Duration::from_millis(500));
    g.up();
    let out = backup.join().expect("backup thread");
    if out.status.success() {
        eprintln!("[nfs] backup across a server restart: finished");
    } else {
        eprintln!("[nfs] backup across a server restart failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let log = c.engine_log();
    eprintln!("[nfs] the engine saw the connection drop: {}", log.contains("NFS connection lost"));
    if !out.status.success() {
        // The next one works.
        env2.ok(&c, &["backup", "create", "-v", "vol3"]);
    }
    let ls = env2.json(&c, &["backup", "ls", "vol3"]);
    let states: Vec<&str> = ls.as_array().expect("array").iter().filter_map(|b| b["state"].as_str()).collect();
    assert!(states.iter().filter(|s| **s == "complete").count() >= 3, "{ls}");
    let data = c.path("data");
    env2.ok(&c, &["backup", "restore", "--latest", "-v", "vol3", "--to", "r", "--data-dir", data.to_str().expect("utf8"), "--replicas", "1"]);
    let (_r, _e, ruri) = serve(&c, &data.join("r").join("replica-0"), "r", 64 * MB);
    sh(&format!("qemu-img compare -f raw -F raw '{}' '{ruri}'", now.display()));
}

#[test]
fn backup_nfs_refuses_an_oversized_object() {
    let c = Cluster::new("vol4", 16 * MB, 1);
    let export = c.path("nfs-export");
    let g = Ganesha::start(&c, &export);
    let env = Env { settings: c.path("settings.json"), vars: vec![] };
    env.ok(&c, &["backup", "target", &g.target()]);
    oversized_block_is_refused(&c, &env, &Dir(export));
}
