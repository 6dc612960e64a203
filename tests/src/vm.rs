//! Booting the test VM (tests/vm/: a Debian 6.12 kernel under qemu TCG, the host's root
//! shared read-only over 9p) to run one scenario script, and reading its `STEP` lines.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("workspace root")
}

/// What one boot printed.
pub struct VmRun {
    pub console: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    /// Context for assertion messages: where the console went, qemu's stderr, the steps
    /// and the console's tail.
    pub ctx: String,
}

impl VmRun {
    /// `STEP name STATUS ...` lines, from `STEP` on.
    pub fn steps(&self) -> Vec<&str> {
        self.console.lines().filter_map(|l| l.find("STEP ").map(|i| &l[i..])).collect()
    }

    /// The status word of step `name` (OK, FAIL, SKIP), if it was reported.
    pub fn status(&self, name: &str) -> Option<String> {
        self.steps().into_iter().find_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            (w.next() == Some(name)).then(|| w.next().unwrap_or("").to_string())
        })
    }
}

/// Boots the VM to run `tests/vm/<script>` with the longhorn binary and `args` (joined
/// by commas) as its arguments; the console is also written to `target/<log_name>`.
/// Panics, with prepare.sh's output, when the VM cannot be set up.
pub fn run(script: &str, args: &[String], log_name: &str, timeout: Duration) -> VmRun {
    let t0 = Instant::now();
    let prep = Command::new(root().join("tests/vm/prepare.sh")).output().expect("running tests/vm/prepare.sh");
    assert!(
        prep.status.success(),
        "the test VM could not be set up (tests/vm/prepare.sh):\n{}{}",
        String::from_utf8_lossy(&prep.stdout),
        String::from_utf8_lossy(&prep.stderr)
    );
    let out = String::from_utf8_lossy(&prep.stdout).to_string();
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("prepare.sh printed no {k}: {out}"))
    };
    let (kernel, initrd, moddir) = (get("KERNEL "), get("INITRD "), get("MODDIR "));
    // Copies, always: the VM reads them over 9p for minutes, and a rebuild meanwhile
    // would swap the binary under it.
    let bin = crate::stage_for_vm(&crate::bin().canonicalize().expect("longhorn binary path"));
    let script = crate::stage_for_vm(&root().join("tests/vm").join(script));
    let mut vm_args = vec![bin.display().to_string()];
    vm_args.extend(args.iter().cloned());
    let append = format!(
        "console=ttyS0 quiet loglevel=3 panic=-1 lh.script={} lh.args={} lh.moddir={moddir}",
        script.display(),
        vm_args.join(",")
    );
    // One host thread runs both vCPUs in turn (thread=single): with a thread per vCPU,
    // the guest kernel's live code patching (static keys, flipped by the NBD driver's
    // memalloc sockets) once raced under TCG and the guest died of "Oops: int3" in
    // __alloc_skb, a CI run lost to the emulator. Costs ~80 s over the three VM tests.
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=single", "-cpu", "max", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .args(["-kernel", &kernel, "-initrd", &initrd, "-append", &append])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64 (tests/run installs qemu-system-x86)");
    let mut stdout = child.stdout.take().expect("qemu stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        String::from_utf8_lossy(&v).to_string()
    });
    let mut timed_out = false;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if t0.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(&bin);
    let _ = std::fs::remove_file(&script);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let log_path = root().join("target").join(log_name);
    let _ = std::fs::write(&log_path, &console);
    let mut run = VmRun { console, elapsed: t0.elapsed(), timed_out, ctx: String::new() };
    let steps = run.steps().join("\n");
    // From the first panic on (with the logs `LogsOnPanic` printed), or the last lines:
    // CI keeps only what the test prints.
    let lines: Vec<&str> = run.console.lines().collect();
    let from = lines.iter().position(|l| l.contains("panicked at")).unwrap_or(lines.len().saturating_sub(60));
    let tail = lines[from..].iter().take(1000).copied().collect::<Vec<_>>().join("\n");
    run.ctx = format!("console in {}; qemu stderr: {err}\nsteps:\n{steps}\nconsole tail:\n{tail}", log_path.display());
    run
}
