//! Test support: an in-memory volume, a server launcher, a child-process runner with
//! a timeout, a raw NBD client and a log capture.
#![allow(dead_code)]

use bytes::Bytes;
use longhorn_engine::api::{BlockBackend, Completer, Extent, IoOp, IoResult, Session};
use longhorn_frontend::nbd::proto::*;
use longhorn_frontend::{NbdServer, NbdServerHandle};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

pub const BLOCK: u64 = 4096;

// ---- In-memory backend ---------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Complete inside `submit`, flush in `push`.
    Sync,
    /// Complete on a worker thread after a delay, each pushed batch in reverse order.
    Async,
}

struct Mem {
    data: Vec<u8>,
    /// One flag per 4 KiB block: written (data) or not (hole).
    alloc: Vec<bool>,
}

/// The volume's state, shared by the backend and its sessions.
pub struct MemInner {
    name: String,
    size: u64,
    mode: Mode,
    mem: Mutex<Mem>,
    pub submitted: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub fua: AtomicU64,
    /// Requests a session still held unpushed when it was dropped (must stay 0).
    pub unpushed_at_drop: AtomicU64,
    /// Requests whose offset is a key here fail with that errno.
    pub fail_at: Mutex<HashMap<u64, i32>>,
    pub async_delay_ms: AtomicU64,
    /// Async mode: the one completion thread shared by all sessions, like an engine's
    /// replica-reply collector. If a frontend's `complete`/`flush` blocked, every client
    /// of the volume would stall.
    worker: Mutex<Option<mpsc::Sender<Work>>>,
}

pub struct MemBackend(Arc<MemInner>);

impl std::ops::Deref for MemBackend {
    type Target = MemInner;
    fn deref(&self) -> &MemInner {
        &self.0
    }
}

impl MemBackend {
    pub fn new(name: &str, size: u64, mode: Mode) -> Arc<MemBackend> {
        let blocks = size.div_ceil(BLOCK) as usize;
        Arc::new(MemBackend(Arc::new(MemInner {
            name: name.to_string(),
            size,
            mode,
            mem: Mutex::new(Mem {
                data: vec![0; size as usize],
                alloc: vec![false; blocks],
            }),
            submitted: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            fua: AtomicU64::new(0),
            unpushed_at_drop: AtomicU64::new(0),
            fail_at: Mutex::new(HashMap::new()),
            async_delay_ms: AtomicU64::new(2),
            worker: Mutex::new(None),
        })))
    }
}

impl MemInner {
    pub fn contents(&self) -> Vec<u8> {
        self.mem.lock().unwrap().data.clone()
    }

    pub fn poke(&self, offset: usize, byte: u8) {
        let mut m = self.mem.lock().unwrap();
        m.data[offset] = byte;
        m.alloc[offset / BLOCK as usize] = true;
    }

    fn range(&self, offset: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let end = offset.checked_add(len)?;
        (end <= self.size).then_some(offset as usize..end as usize)
    }

    fn execute(&self, op: IoOp) -> IoResult {
        let off = match &op {
            IoOp::Read { offset, .. }
            | IoOp::Write { offset, .. }
            | IoOp::WriteZeroes { offset, .. }
            | IoOp::Trim { offset, .. }
            | IoOp::BlockStatus { offset, .. } => Some(*offset),
            IoOp::Flush => None,
        };
        if let Some(errno) = off.and_then(|o| self.fail_at.lock().unwrap().get(&o).copied()) {
            return IoResult::Err(errno);
        }
        let mut m = self.mem.lock().unwrap();
        match op {
            IoOp::Read { offset, len } => match self.range(offset, len as u64) {
                Some(r) => IoResult::Data(Bytes::copy_from_slice(&m.data[r])),
                None => IoResult::Err(libc::EINVAL),
            },
            IoOp::Write { offset, data, fua } => match self.range(offset, data.len() as u64) {
                Some(r) => {
                    self.writes.fetch_add(1, Ordering::SeqCst);
                    if fua {
                        self.fua.fetch_add(1, Ordering::SeqCst);
                    }
                    let (b0, b1) = (r.start / BLOCK as usize, r.end.div_ceil(BLOCK as usize));
                    m.data[r].copy_from_slice(&data);
                    for a in &mut m.alloc[b0..b1] {
                        *a = true;
                    }
                    IoResult::Done
                }
                None => IoResult::Err(libc::ENOSPC),
            },
            IoOp::WriteZeroes { offset, len, fua } | IoOp::Trim { offset, len, fua } => {
                match self.range(offset, len as u64) {
                    Some(r) => {
                        if fua {
                            self.fua.fetch_add(1, Ordering::SeqCst);
                        }
                        m.data[r.clone()].fill(0);
                        // Whole blocks become holes; partial ones stay as they were.
                        let b0 = r.start.div_ceil(BLOCK as usize);
                        let b1 = r.end / BLOCK as usize;
                        for b in b0..b1.max(b0) {
                            m.alloc[b] = false;
                        }
                        IoResult::Done
                    }
                    None => IoResult::Err(libc::EINVAL),
                }
            }
            IoOp::Flush => {
                self.flushes.fetch_add(1, Ordering::SeqCst);
                IoResult::Done
            }
            IoOp::BlockStatus { offset, len } => match self.range(offset, len as u64) {
                Some(r) => {
                    let mut out: Vec<Extent> = Vec::new();
                    let mut pos = r.start;
                    while pos < r.end {
                        let b = pos / BLOCK as usize;
                        let next = ((b + 1) * BLOCK as usize).min(r.end);
                        let hole = !m.alloc[b];
                        let len = (next - pos) as u32;
                        match out.last_mut() {
                            Some(e) if e.hole == hole => e.len += len,
                            _ => out.push(Extent { len, hole }),
                        }
                        pos = next;
                    }
                    IoResult::Extents(out)
                }
                None => IoResult::Err(libc::EINVAL),
            },
        }
    }
}

impl BlockBackend for MemBackend {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn open_session(&self, completer: Arc<dyn Completer>) -> io::Result<Box<dyn Session>> {
        Ok(Box::new(MemSession::new(self.0.clone(), completer)))
    }
}

type Batch = Vec<(u64, IoOp)>;
/// A batch of requests and where their results go.
type Work = (Arc<dyn Completer>, Batch);

struct MemSession {
    backend: Arc<MemInner>,
    completer: Arc<dyn Completer>,
    batch: Mutex<Batch>,
}

impl MemSession {
    fn new(backend: Arc<MemInner>, completer: Arc<dyn Completer>) -> MemSession {
        MemSession {
            backend,
            completer,
            batch: Mutex::new(Vec::new()),
        }
    }
}

/// Start (once) the shared completion thread of an async backend.
fn worker(inner: &Arc<MemInner>) -> mpsc::Sender<Work> {
    let mut w = inner.worker.lock().unwrap();
    if let Some(tx) = w.as_ref() {
        return tx.clone();
    }
    let (tx, rx) = mpsc::channel::<Work>();
    let weak = Arc::downgrade(inner);
    std::thread::spawn(move || {
        while let Ok((c, batch)) = rx.recv() {
            let Some(b) = weak.upgrade() else { return };
            std::thread::sleep(Duration::from_millis(
                b.async_delay_ms.load(Ordering::SeqCst),
            ));
            for (tag, op) in batch.into_iter().rev() {
                c.complete(tag, b.execute(op));
            }
            c.flush();
        }
    });
    *w = Some(tx.clone());
    tx
}

impl Session for MemSession {
    fn submit(&self, tag: u64, op: IoOp) {
        self.backend.submitted.fetch_add(1, Ordering::SeqCst);
        match self.backend.mode {
            Mode::Sync => self.completer.complete(tag, self.backend.execute(op)),
            Mode::Async => self.batch.lock().unwrap().push((tag, op)),
        }
    }
    fn push(&self) {
        match self.backend.mode {
            Mode::Sync => self.completer.flush(),
            Mode::Async => {
                let batch = std::mem::take(&mut *self.batch.lock().unwrap());
                if !batch.is_empty() {
                    let _ = worker(&self.backend).send((self.completer.clone(), batch));
                }
            }
        }
    }
}

impl Drop for MemSession {
    fn drop(&mut self) {
        // The frontend must push everything it submitted before dropping the session.
        let left = self.batch.lock().unwrap().len();
        if left > 0 {
            self.backend
                .unpushed_at_drop
                .fetch_add(left as u64, Ordering::SeqCst);
        }
    }
}

// ---- Server launcher -----------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub enum Transport {
    Unix,
    Tcp,
}

#[derive(Clone, Debug)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

pub struct TestDir(pub PathBuf);
impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "lh-nbd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestServer {
    pub handle: Option<NbdServerHandle>,
    pub uri: String,
    pub addr: Addr,
    pub backend: Arc<MemBackend>,
    pub dir: TestDir,
}

impl TestServer {
    pub fn backend_name(&self) -> String {
        self.backend.name().to_string()
    }
}

static NAMES: AtomicU64 = AtomicU64::new(0);

pub fn start(transport: Transport, size: u64, mode: Mode) -> TestServer {
    init_logs();
    let name = format!("vol{}", NAMES.fetch_add(1, Ordering::SeqCst));
    let backend = MemBackend::new(&name, size, mode);
    let dir = TestDir::new("srv");
    let (listen, addr) = match transport {
        Transport::Unix => {
            let p = dir.path("nbd.sock");
            (format!("unix:{}", p.display()), Some(Addr::Unix(p)))
        }
        Transport::Tcp => ("tcp:127.0.0.1:0".to_string(), None),
    };
    let server = NbdServer::bind(&listen, backend.clone()).expect("bind");
    let uri = server.uri();
    let addr = addr.unwrap_or_else(|| {
        let hostport = uri
            .strip_prefix("nbd://")
            .and_then(|s| s.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected TCP uri {uri}"));
        Addr::Tcp(hostport.parse().unwrap())
    });
    let handle = server.spawn().expect("spawn");
    TestServer {
        handle: Some(handle),
        uri,
        addr,
        backend,
        dir,
    }
}

// ---- Running client programs ---------------------------------------------------------

pub struct Out {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }
}

/// Run a program with a 120 s timeout, capturing its output. Panics if it is not
/// installed or does not finish in time (a hung server must fail the test, not hang it).
pub fn run(prog: &str, args: &[&str]) -> Out {
    run_timeout(prog, args, Duration::from_secs(120))
}

pub fn run_timeout(prog: &str, args: &[&str], timeout: Duration) -> Out {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog} (is it installed?): {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{prog} {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        status: status.code(),
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---- Raw client ----------------------------------------------------------------------

pub enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}
impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

pub struct Client {
    pub s: Sock,
}

impl Client {
    pub fn connect(addr: &Addr) -> Client {
        let s = match addr {
            Addr::Unix(p) => {
                let s = UnixStream::connect(p).expect("connect unix");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Sock::Unix(s)
            }
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).expect("connect tcp");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Sock::Tcp(s)
            }
        };
        Client { s }
    }

    /// Connect and read the greeting; returns the handshake flags.
    pub fn greet(addr: &Addr) -> (Client, u16) {
        let mut c = Client::connect(addr);
        assert_eq!(c.u64(), NBDMAGIC, "greeting magic");
        assert_eq!(c.u64(), IHAVEOPT, "greeting IHAVEOPT");
        let flags = c.u16();
        (c, flags)
    }

    /// How the server names this connection in its logs, where that is unique (TCP).
    pub fn peer_in_logs(&self) -> Option<String> {
        match &self.s {
            Sock::Tcp(s) => Some(format!("peer=tcp:{}", s.local_addr().ok()?)),
            Sock::Unix(_) => None,
        }
    }

    pub fn shutdown_write(&self) {
        let _ = match &self.s {
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).expect("read from server");
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    pub fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        OptReply {
            opt,
            typ,
            data: self.bytes(len),
        }
    }

    /// Full handshake with NBD_OPT_GO on the default export.
    pub fn open(addr: &Addr, structured: bool, meta: bool) -> (Client, u64, u16) {
        let (mut c, _) = Client::greet(addr);
        c.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.opt_reply().typ, NBD_REP_ACK);
        }
        if meta {
            c.opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_query("", &[BASE_ALLOCATION]),
            );
            let r = c.opt_reply();
            assert_eq!(r.typ, NBD_REP_META_CONTEXT);
            assert_eq!(&r.data[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(c.opt_reply().typ, NBD_REP_ACK);
        }
        c.opt(NBD_OPT_GO, &go_data("", &[]));
        let (mut size, mut flags) = (None, None);
        loop {
            let r = c.opt_reply();
            match r.typ {
                NBD_REP_INFO => {
                    if u16::from_be_bytes([r.data[0], r.data[1]]) == NBD_INFO_EXPORT {
                        size = Some(u64::from_be_bytes(r.data[2..10].try_into().unwrap()));
                        flags = Some(u16::from_be_bytes([r.data[10], r.data[11]]));
                    }
                }
                NBD_REP_ACK => break,
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
        (c, size.expect("NBD_INFO_EXPORT"), flags.expect("flags"))
    }

    pub fn request(
        &mut self,
        flags: u16,
        typ: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut v = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
        Request {
            flags,
            typ,
            handle,
            offset,
            len,
        }
        .encode(&mut v);
        v.extend_from_slice(payload);
        self.send(&v);
    }

    /// A simple reply; `data_len` bytes follow it if it reports success.
    pub fn simple(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        assert_eq!(self.u32(), NBD_SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = self.u32();
        let handle = self.u64();
        let data = if err == 0 {
            self.bytes(data_len)
        } else {
            Vec::new()
        };
        (handle, err, data)
    }

    pub fn chunk(&mut self) -> Chunk {
        assert_eq!(
            self.u32(),
            NBD_STRUCTURED_REPLY_MAGIC,
            "structured reply magic"
        );
        let flags = self.u16();
        let typ = self.u16();
        let handle = self.u64();
        let len = self.u32() as usize;
        Chunk {
            flags,
            typ,
            handle,
            payload: self.bytes(len),
        }
    }

    /// Read until the server closes; returns what arrived first. Panics on timeout.
    pub fn expect_closed(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!("expected the server to close the connection, got: {e}"),
            }
        }
    }
}

/// Data of NBD_OPT_GO / NBD_OPT_INFO.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Data of NBD_OPT_{SET,LIST}_META_CONTEXT.
pub fn meta_query(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Decode a structured error chunk: (error, message).
pub fn error_chunk(c: &Chunk) -> (u32, String) {
    assert_eq!(
        c.typ, NBD_REPLY_TYPE_ERROR,
        "expected an error chunk, got {c:?}"
    );
    assert!(c.flags & NBD_REPLY_FLAG_DONE != 0);
    let err = u32::from_be_bytes(c.payload[0..4].try_into().unwrap());
    let mlen = u16::from_be_bytes([c.payload[4], c.payload[5]]) as usize;
    (
        err,
        String::from_utf8(c.payload[6..6 + mlen].to_vec()).unwrap(),
    )
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn socket_exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

// ---- Log capture ---------------------------------------------------------------------

pub static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

struct Fields(String);
impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        if f.name() == "message" {
            let _ = write!(self.0, " {v:?}");
        } else {
            let _ = write!(self.0, " {}={v:?}", f.name());
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        e.record(&mut f);
        let line = format!("{}{}", e.metadata().level(), f.0);
        if std::env::var_os("NBD_TEST_LOG").is_some() {
            eprintln!("{line}");
        }
        LOGS.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Capture);
    });
}

/// Wait until a captured log line contains all of `needles`.
pub fn expect_log(needles: &[&str]) -> String {
    let mut found = None;
    wait_until(&format!("a log line containing {needles:?}"), || {
        found = LOGS
            .lock()
            .unwrap()
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
            .cloned();
        found.is_some()
    });
    found.unwrap_or_default()
}
