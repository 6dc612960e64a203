//! ReadWriteMany on this host: `longhorn share VOL` serves the volume's filesystem with
//! NFS-Ganesha over NFSv4, and userspace NFS clients (libnfs: `nfs-cat`, `nfs-ls`,
//! `nfs-cp`, and libnfs itself for appends) use it. The host kernel has no NFS client;
//! the VM test (vm_share_nfs.rs) mounts the share with the kernel's.
//!
//! The seed's scenario: a writer appends a timestamp line to index.html ten times a
//! second while three readers read it; then a reader appends "longhorn rwx access
//! mode"; every reader sees every line, in order, none torn or lost.

use longhorn_tests::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn require(tools: &[&str]) {
    for t in tools {
        assert!(have(t), "{t} is not installed (tests/run installs nfs-ganesha, nfs-ganesha-vfs, libnfs-utils)");
    }
}

/// Appends through libnfs (the library behind nfs-cp), loaded at run time: the
/// command-line tools can only create files, not append to them.
mod libnfs {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};

    #[repr(C)]
    struct NfsUrl {
        server: *mut c_char,
        path: *mut c_char,
        file: *mut c_char,
    }

    type Ctx = *mut c_void;
    type Fh = *mut c_void;

    pub struct Client {
        ctx: Ctx,
        fh: Fh,
        file: String,
        pwrite: unsafe extern "C" fn(Ctx, Fh, u64, u64, *const c_void) -> c_int,
        fstat64: unsafe extern "C" fn(Ctx, Fh, *mut u64) -> c_int,
        close: unsafe extern "C" fn(Ctx, Fh) -> c_int,
        destroy: unsafe extern "C" fn(Ctx),
        get_error: unsafe extern "C" fn(Ctx) -> *const c_char,
    }

    // The context is used from one thread at a time.
    unsafe impl Send for Client {}

    unsafe fn sym<T>(lib: *mut c_void, name: &str) -> Result<T, String> {
        let n = CString::new(name).map_err(|e| e.to_string())?;
        let p = libc::dlsym(lib, n.as_ptr());
        if p.is_null() {
            return Err(format!("libnfs has no {name}"));
        }
        Ok(std::mem::transmute_copy(&p))
    }

    impl Client {
        fn err(&self) -> String {
            // SAFETY: libnfs returns a NUL-terminated string owned by the context.
            unsafe {
                let p = (self.get_error)(self.ctx);
                if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
            }
        }

        /// Mounts the share of `url` (nfs://HOST/EXPORT/FILE?version=4&nfsport=P) and
        /// opens FILE for writing.
        pub fn open(url: &str) -> Result<Client, String> {
            // SAFETY: plain C calls into libnfs 4.0 with the prototypes of its header
            // (nfsc/libnfs.h); every pointer passed is valid for the call.
            unsafe {
                let name = CString::new("libnfs.so.13").map_err(|e| e.to_string())?;
                let lib = libc::dlopen(name.as_ptr(), libc::RTLD_NOW);
                if lib.is_null() {
                    return Err("cannot load libnfs.so.13 (Debian libnfs13)".into());
                }
                let init: unsafe extern "C" fn() -> Ctx = sym(lib, "nfs_init_context")?;
                let parse: unsafe extern "C" fn(Ctx, *const c_char) -> *mut NfsUrl = sym(lib, "nfs_parse_url_full")?;
                let destroy_url: unsafe extern "C" fn(*mut NfsUrl) = sym(lib, "nfs_destroy_url")?;
                let mount: unsafe extern "C" fn(Ctx, *const c_char, *const c_char) -> c_int = sym(lib, "nfs_mount")?;
                let open: unsafe extern "C" fn(Ctx, *const c_char, c_int, *mut Fh) -> c_int = sym(lib, "nfs_open")?;
                let mut c = Client {
                    ctx: init(),
                    fh: std::ptr::null_mut(),
                    file: String::new(),
                    pwrite: sym(lib, "nfs_pwrite")?,
                    fstat64: sym(lib, "nfs_fstat64")?,
                    close: sym(lib, "nfs_close")?,
                    destroy: sym(lib, "nfs_destroy_context")?,
                    get_error: sym(lib, "nfs_get_error")?,
                };
                if c.ctx.is_null() {
                    return Err("nfs_init_context failed".into());
                }
                let u = CString::new(url).map_err(|e| e.to_string())?;
                let pu = parse(c.ctx, u.as_ptr());
                if pu.is_null() {
                    return Err(format!("parsing {url}: {}", c.err()));
                }
                c.file = CStr::from_ptr((*pu).file).to_string_lossy().into_owned();
                let r = mount(c.ctx, (*pu).server, (*pu).path);
                let r2 = if r == 0 { open(c.ctx, (*pu).file, libc::O_WRONLY, &mut c.fh) } else { r };
                destroy_url(pu);
                if r != 0 {
                    return Err(format!("mounting {url}: {}", c.err()));
                }
                if r2 != 0 {
                    return Err(format!("opening {}: {}", c.file, c.err()));
                }
                Ok(c)
            }
        }

        pub fn size(&self) -> Result<u64, String> {
            let mut st = [0u64; 16];
            // SAFETY: struct nfs_stat_64 is 14 u64 fields; the buffer holds 16.
            let r = unsafe { (self.fstat64)(self.ctx, self.fh, st.as_mut_ptr()) };
            if r != 0 {
                return Err(format!("fstat {}: {}", self.file, self.err()));
            }
            Ok(st[7])
        }

        pub fn pwrite(&self, mut off: u64, mut data: &[u8]) -> Result<(), String> {
            while !data.is_empty() {
                // SAFETY: data is valid for data.len() bytes.
                let n = unsafe { (self.pwrite)(self.ctx, self.fh, off, data.len() as u64, data.as_ptr() as *const c_void) };
                if n <= 0 {
                    return Err(format!("write to {} at {off}: {}", self.file, self.err()));
                }
                off += n as u64;
                data = &data[n as usize..];
            }
            Ok(())
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            // SAFETY: fh and ctx came from this context and are released once.
            unsafe {
                if !self.fh.is_null() {
                    (self.close)(self.ctx, self.fh);
                }
                (self.destroy)(self.ctx);
            }
        }
    }
}

/// A running `longhorn share`, stopped on drop (SIGTERM, else SIGKILL); its export
/// directory is unmounted then (lazily), so a failing test leaves no mount behind.
struct Share {
    proc: Proc,
    port: u16,
    export: PathBuf,
    volume: String,
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.proc.alive() {
            // A clean stop first: a share that started its volume stops it (its `up`
            // lives in a session of its own and would outlive a SIGKILL).
            if !self.proc.term() {
                self.proc.kill9();
            }
            let _ = sh_try(&format!("umount -l '{}' 2>/dev/null", self.export.display()));
        }
    }
}

impl Share {
    fn start(run_dir: &Path, log: &Path, volume: &str, extra: &[&str]) -> Share {
        let rd = run_dir.display().to_string();
        let mut args = vec!["share", volume, "--port", "0", "--run-dir", rd.as_str()];
        args.extend_from_slice(extra);
        let (proc, _) = spawn(&args, log, "ready").expect("longhorn share starts");
        let st = state(run_dir, volume);
        let port = st["port"].as_u64().expect("port in state.json") as u16;
        let export = PathBuf::from(st["export_dir"].as_str().expect("export_dir"));
        Share { proc, port, export, volume: volume.to_string() }
    }

    fn url(&self, file: &str) -> String {
        format!("nfs://127.0.0.1/{}/{file}?version=4&nfsport={}", self.volume, self.port)
    }
}

fn state(run_dir: &Path, volume: &str) -> serde_json::Value {
    let p = run_dir.join(format!("{volume}.share/state.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_default()).unwrap_or_default()
}

fn nfs_cat(url: &str) -> Result<String, String> {
    let (ok, out) = sh_try(&format!("nfs-cat '{url}' 2>&1"));
    if ok { Ok(out) } else { Err(out) }
}

/// Appends one line through a fresh NFS client (open, size, write at the end).
fn nfs_append(url: &str, line: &str) -> Result<(), String> {
    let c = libnfs::Client::open(url)?;
    let sz = c.size()?;
    c.pwrite(sz, line.as_bytes())
}

/// Checks one reader's view of index.html: whole lines, the writer's in sequence from
/// 0, then at most the final line. Returns the number of lines.
fn check_view(text: &str) -> Result<usize, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(format!("torn last line: {:?}", text.lines().last()));
    }
    let mut n = 0;
    let mut done = false;
    for (i, l) in text.lines().enumerate() {
        if done {
            return Err(format!("line {i} after the final line: {l:?}"));
        }
        if l == "longhorn rwx access mode" {
            done = true;
        } else {
            let want = format!("seq={i:05} ");
            if !l.starts_with(&want) || !l.contains(" ts=") {
                return Err(format!("line {i} is {l:?}, expected it to start with {want:?}"));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// The seed's scenario against a running share; returns the expected content of
/// index.html and a line for the record.
fn writer_and_readers(s: &Share, seconds: f64) -> (String, String) {
    let url = s.url("index.html");
    sh(&format!("printf '' > '{}/empty' && nfs-cp '{}/empty' '{}'", std::env::temp_dir().display(), std::env::temp_dir().display(), url));
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..3 {
        let (url, stop) = (url.clone(), stop.clone());
        readers.push(std::thread::spawn(move || -> Result<(usize, usize), String> {
            let (mut reads, mut last) = (0usize, 0usize);
            while !stop.load(Ordering::Acquire) {
                let text = nfs_cat(&url).map_err(|e| format!("reader {r}: nfs-cat failed: {e}"))?;
                let n = check_view(&text).map_err(|e| format!("reader {r}, read {reads}: {e}\n{text}"))?;
                if n < last {
                    return Err(format!("reader {r}: saw {n} lines after {last}"));
                }
                last = n;
                reads += 1;
                std::thread::sleep(Duration::from_millis(30));
            }
            Ok((reads, last))
        }));
    }
    let w = libnfs::Client::open(&url).expect("writer opens index.html over NFS");
    let mut off = w.size().expect("size");
    let mut expected = String::new();
    let t = Instant::now();
    let mut seq = 0;
    while t.elapsed().as_secs_f64() < seconds {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos();
        let line = format!("seq={seq:05} ts={ts}\n");
        w.pwrite(off, line.as_bytes()).expect("writer appends");
        off += line.len() as u64;
        expected.push_str(&line);
        seq += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(w);
    // Then a reader appends.
    nfs_append(&url, "longhorn rwx access mode\n").expect("a reader appends its line");
    expected.push_str("longhorn rwx access mode\n");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let mut reads = Vec::new();
    for r in readers {
        let (n, _) = r.join().expect("reader thread").unwrap_or_else(|e| panic!("{e}"));
        reads.push(n);
    }
    for r in 0..3 {
        assert_eq!(nfs_cat(&url).expect("final read"), expected, "reader {r}'s final view differs from what was written");
    }
    (expected, format!("{seq} writer lines in {seconds} s; reads per reader {reads:?}"))
}

#[test]
fn share_existing_filesystem_writer_and_three_readers() {
    require(&["ganesha.nfsd", "nfs-cat", "nfs-ls", "nfs-cp", "mkfs.ext4", "e2fsck", "blkid"]);
    let t0 = Instant::now();
    let mut c = Cluster::new("lhshare1", 128 * MB, 3);
    c.stop_engine();
    let mut args = c.engine_args();
    args.extend(["--frontend".into(), "fuse".into()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (proc, uri) = spawn(&a, &c.path("engine-fuse.log"), "ready").expect("engine with --frontend fuse");
    c.engine = Some(Engine { proc, uri, sock: c.path("vol.nbd") });
    let dev = PathBuf::from("/dev/longhorn/lhshare1");

    // A filesystem with files, made before the volume is shared; its top belongs to the
    // anonymous user, as a root-squashed share needs for clients to write there.
    sh(&format!("mkfs.ext4 -q -F -E root_owner=65534:65534 '{}'", dev.display()));
    let mnt = c.path("pre");
    std::fs::create_dir_all(&mnt).expect("mount point");
    sh(&format!("mount '{}' '{}'", dev.display(), mnt.display()));
    random_file(&mnt.join("before.bin"), 3 * MB + 17);
    std::fs::write(mnt.join("hello.txt"), "written before sharing\n").expect("write");
    let sum = sh(&format!("cd '{}' && sha256sum before.bin", mnt.display()));
    sh(&format!("umount '{}'", mnt.display()));

    let s = Share::start(&c.run_dir(), &c.path("share.log"), "lhshare1", &[]);
    let st = state(&c.run_dir(), "lhshare1");
    assert_eq!(st["formatted"], false, "an existing filesystem is not reformatted: {st}");
    assert!(s.proc.log_text().contains("not formatting"), "{}", s.proc.log_text());
    assert_eq!(nfs_cat(&s.url("hello.txt")).expect("nfs-cat hello.txt"), "written before sharing\n");
    let ls = sh(&format!("nfs-ls '{}'", s.url("").replace("/?", "?")));
    assert!(ls.contains("before.bin") && ls.contains("hello.txt"), "nfs-ls shows the files: {ls}");
    let local = c.path("before.copy");
    sh(&format!("nfs-cp '{}' '{}'", s.url("before.bin"), local.display()));
    let got = sh(&format!("cd '{}' && sha256sum before.copy", c.tmp.path().display()));
    assert_eq!(got.split_whitespace().next(), sum.split_whitespace().next(), "before.bin over NFS matches");

    // volume info shows the access mode, share state and export address.
    let vi = c.cli(&["volume", "info", "-v", "lhshare1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&vi.stdout).expect("volume info json");
    assert_eq!(v["access_mode"], "ReadWriteMany", "{v}");
    assert_eq!(v["share_state"], "serving", "{v}");
    assert_eq!(v["share_endpoint"], "127.0.0.1:/lhshare1", "{v}");
    let table = String::from_utf8_lossy(&c.cli(&["volume", "ls"]).stdout).to_string();
    assert!(table.contains("ReadWriteMany") && table.contains("127.0.0.1:/lhshare1"), "{table}");

    // The seed's scenario.
    let (mut expected, record) = writer_and_readers(&s, 3.0);
    eprintln!("rwx scenario: {record}");

    // Root over NFS is squashed: what the writer made belongs to nobody on the volume,
    // and the filesystem is mounted nosuid,nodev on the share manager's host.
    let export = c.run_dir().join("lhshare1.share").join("export");
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(export.join("index.html")).expect("stat index.html"));
    assert_eq!(uid, 65534, "a file root made over NFS is owned by uid {uid}, not squashed to nobody");
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    let real = std::fs::canonicalize(&export).expect("export path");
    let line = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some(&*real.to_string_lossy())).expect("export mounted");
    let opts = line.split_whitespace().nth(3).unwrap_or("");
    assert!(opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"), "export mount options: {opts}");

    // Kill the NFS server: the share manager restarts it and clients carry on.
    let old = state(&c.run_dir(), "lhshare1")["server_pid"].as_i64().expect("server_pid");
    // SAFETY: killing the server our share manager started.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    let t = Instant::now();
    let back = loop {
        let st = state(&c.run_dir(), "lhshare1");
        if st["state"] == "serving" && st["server_pid"].as_i64() != Some(old) {
            if let Ok(text) = nfs_cat(&s.url("index.html")) {
                break (t.elapsed(), text);
            }
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no NFS server back 20 s after a kill; log:\n{}", s.proc.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(back.1, expected, "content after the server restart");
    eprintln!("NFS server killed: serving again after {:?}", back.0);
    assert_eq!(state(&c.run_dir(), "lhshare1")["restarts"], 1);

    // Kill a replica under the share: no client error.
    c.replicas[2].proc.kill9();
    for i in 0..10 {
        let line = format!("after replica kill {i}\n");
        nfs_append(&s.url("index.html"), &line).expect("append after a replica kill");
        expected.push_str(&line);
        assert_eq!(nfs_cat(&s.url("index.html")).expect("read after a replica kill"), expected);
    }

    // Stop: server stopped, filesystem unmounted; the device stays (the engine owns it).
    let mut s = s;
    assert!(s.proc.term(), "share manager stops cleanly; log:\n{}", s.proc.log_text());
    let log = s.proc.log_text();
    let pos = |w: &str| log.find(w).unwrap_or_else(|| panic!("{w:?} not in the log:\n{log}"));
    assert!(pos("NFS server stopped") < pos("filesystem unmounted"), "stop order:\n{log}");
    assert!(!sh("cat /proc/mounts").contains(&s.export.display().to_string()), "export unmounted");
    assert_eq!(state(&c.run_dir(), "lhshare1")["state"], "stopped");
    let v: serde_json::Value = serde_json::from_slice(&c.cli(&["volume", "info", "-v", "lhshare1", "--json"]).stdout).expect("json");
    assert_eq!(v["share_state"], "stopped", "{v}");
    assert!(v["share_endpoint"].is_null(), "{v}");

    let (ok, out) = sh_try(&format!("e2fsck -fn '{}'", dev.display()));
    assert!(ok, "e2fsck -fn after the share stopped:\n{out}");
    sh(&format!("mount '{}' '{}'", dev.display(), mnt.display()));
    let on_disk = std::fs::read_to_string(mnt.join("index.html")).unwrap_or_default();
    let sum2 = sh(&format!("cd '{}' && sha256sum before.bin", mnt.display()));
    sh(&format!("umount '{}'", mnt.display()));
    assert_eq!(on_disk, expected, "every line written through NFS is on the volume");
    assert_eq!(sum2, sum);
    c.stop_engine();
    eprintln!("share test took {:?}", t0.elapsed());
}

/// With no engine running, `longhorn share --size` starts the volume itself (frontend
/// auto), formats the empty volume, and at stop detaches it; sharing it again finds
/// the filesystem and the file written the first time.
#[test]
fn share_starts_the_volume_formats_once_and_detaches() {
    require(&["ganesha.nfsd", "nfs-cat", "nfs-cp", "mkfs.ext4", "blkid"]);
    let tmp = tempfile::Builder::new().prefix("lh-share-").tempdir_in(test_root()).expect("tempdir");
    let run = tmp.path().join("run");
    let data = tmp.path().join("data").display().to_string();
    let extra = ["--size", "64M", "--replicas", "2", "--data-dir", data.as_str()];
    let dev = PathBuf::from("/dev/longhorn/lhshare2");
    let file = tmp.path().join("f.txt");
    std::fs::write(&file, "first share\n").expect("write");

    let mut s = Share::start(&run, &tmp.path().join("share1.log"), "lhshare2", &extra);
    assert_eq!(state(&run, "lhshare2")["formatted"], true, "an empty volume is formatted");
    assert!(dev.exists(), "the share manager attached the volume");
    sh(&format!("nfs-cp '{}' '{}'", file.display(), s.url("f.txt")));
    assert!(s.proc.term(), "clean stop; log:\n{}", s.proc.log_text());
    assert!(s.proc.log_text().contains("volume detached and stopped"), "{}", s.proc.log_text());
    assert!(!dev.exists(), "{} is gone after the stop", dev.display());

    let mut s = Share::start(&run, &tmp.path().join("share2.log"), "lhshare2", &extra);
    assert_eq!(state(&run, "lhshare2")["formatted"], false, "the second share finds the filesystem");
    assert_eq!(nfs_cat(&s.url("f.txt")).expect("nfs-cat"), "first share\n");
    assert!(s.proc.term(), "clean stop; log:\n{}", s.proc.log_text());
    assert!(!dev.exists());
}

/// `accessMode: ReadWriteMany` in the volume spec: `longhorn up` runs the share manager
/// after the engine, shows the export, and stops it before the engine on Ctrl-C.
#[test]
fn up_with_read_write_many_spec_serves_nfs() {
    require(&["ganesha.nfsd", "nfs-ls"]);
    let tmp = tempfile::Builder::new().prefix("lh-share-up-").tempdir_in(test_root()).expect("tempdir");
    let spec = tmp.path().join("spec.json");
    std::fs::write(&spec, r#"{"accessMode": "ReadWriteMany", "numberOfReplicas": "2"}"#).expect("spec");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port().to_string();
    let (run, data) = (tmp.path().join("run").display().to_string(), tmp.path().join("data").display().to_string());
    let args = [
        "up", "lhshare3", "--size", "64M", "--spec", spec.to_str().expect("utf8"), "--share-port", port.as_str(),
        "--data-dir", data.as_str(), "--run-dir", run.as_str(),
    ];
    let (mut up, _) = spawn(&args, &tmp.path().join("up.log"), "Ctrl-C").expect("longhorn up with an RWX spec");
    let ls = sh(&format!("nfs-ls 'nfs://127.0.0.1/lhshare3?version=4&nfsport={port}'"));
    assert!(ls.contains("lost+found"), "the new volume was formatted and is served: {ls}");
    let v = std::process::Command::new(bin()).args(["volume", "info", "-v", "lhshare3", "--json", "--run-dir", run.as_str()]).output().expect("volume info");
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).expect("json");
    assert_eq!(v["access_mode"], "ReadWriteMany", "{v}");
    assert_eq!(v["share_state"], "serving", "{v}");
    assert!(up.term(), "longhorn up stops the share, the engine and the replicas; log:\n{}", up.log_text());
    assert!(!Path::new("/dev/longhorn/lhshare3").exists());
}

/// Polls `f` every 200 ms for up to 15 s (the share reads its clients file every second).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(15), "{what}: not within 15 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--clients FILE`: only the addresses listed there may mount. Changes reach the
/// running server (the same process, not a restart), a client still listed keeps its
/// open file across them, a client taken off is shut out, and a bad line leaves the
/// list as it was.
#[test]
fn share_lets_in_only_listed_clients() {
    require(&["ganesha.nfsd", "nfs-ls"]);
    let tmp = tempfile::Builder::new().prefix("lh-share-clients-").tempdir_in(test_root()).expect("tempdir");
    let run = tmp.path().join("run");
    let data = tmp.path().join("data").display().to_string();
    let clients = tmp.path().join("clients");
    std::fs::write(&clients, "# only another host\n127.0.0.2\n").expect("clients file");
    let cl = clients.display().to_string();
    let extra = ["--size", "64M", "--replicas", "1", "--data-dir", data.as_str(), "--clients", cl.as_str()];
    let mut s = Share::start(&run, &tmp.path().join("share.log"), "lhshare4", &extra);
    let pid = state(&run, "lhshare4")["server_pid"].clone();
    assert_eq!(state(&run, "lhshare4")["clients"], serde_json::json!(["127.0.0.2"]));
    let ls = || sh_try(&format!("nfs-ls '{}' 2>&1", s.url("").replace("/?", "?")));

    let (ok, out) = ls();
    assert!(!ok, "127.0.0.1 is not listed, yet it lists the share: {out}");

    std::fs::write(&clients, "127.0.0.2\n127.0.0.1\n").expect("clients file");
    eventually("127.0.0.1 let in", || ls().0);
    // A user who is not root on a listed host speaks from an unprivileged port: with
    // sec=sys it could claim to be anyone, so it is refused (PrivilegedPort).
    let (ok, out) = sh_try(&format!("setpriv --reuid=65534 --regid=65534 --clear-groups nfs-ls '{}' 2>&1", s.url("").replace("/?", "?")));
    assert!(!ok, "an unprivileged process listed the share: {out}");
    let local = tmp.path().join("kept.txt");
    std::fs::write(&local, "before\n").expect("write");
    sh(&format!("nfs-cp '{}' '{}'", local.display(), s.url("kept.txt")));
    let c = libnfs::Client::open(&s.url("kept.txt")).expect("a listed client opens a file");

    // Another address added: the open file of the client still listed is undisturbed.
    std::fs::write(&clients, "127.0.0.2\n127.0.0.1\n127.0.0.3\n").expect("clients file");
    eventually("three clients", || state(&run, "lhshare4")["clients"].as_array().is_some_and(|a| a.len() == 3));
    c.pwrite(7, b"after\n").expect("the open file still takes writes after a change of clients");
    drop(c);
    assert_eq!(nfs_cat(&s.url("kept.txt")).expect("nfs-cat"), "before\nafter\n");

    // A bad line: the list in force stays.
    std::fs::write(&clients, "127.0.0.1\nnode-b\n").expect("clients file");
    eventually("the bad line reported", || s.proc.log_text().contains("node-b"));
    assert!(s.proc.log_text().contains("is not an IP address"), "{}", s.proc.log_text());
    assert_eq!(state(&run, "lhshare4")["clients"].as_array().map(|a| a.len()), Some(3));
    assert!(ls().0, "the list in force still lets 127.0.0.1 in");

    // Taken off: shut out.
    std::fs::write(&clients, "127.0.0.2\n").expect("clients file");
    eventually("127.0.0.1 shut out", || !ls().0);
    assert_eq!(state(&run, "lhshare4")["server_pid"], pid, "the same server all along (reloaded, never restarted)");
    assert_eq!(state(&run, "lhshare4")["restarts"], 0);
    // A clean stop: the share manager started the volume, and stops it.
    assert!(s.proc.term(), "clean stop; log:\n{}", s.proc.log_text());
    assert!(s.proc.log_text().contains("volume detached and stopped"), "{}", s.proc.log_text());
}
