//! The transports a replica is reached over: TCP (`HOST:PORT`, any host) or a unix
//! socket (`unix:PATH`, a replica on the engine's own host). The project's other
//! sockets use the same pieces (this is the lowest crate): the NBD server's connections
//! are a [`Stream`], and every listening unix socket (replica, engine control, NBD
//! export, CSI endpoint) is bound by [`bind_private_unix`].
//!
//! Both carry the same byte stream (the frames of [`crate::proto`], checksums and the
//! handshake of [`crate::auth`] included); only the socket differs. On this machine a
//! unix-socket round trip across vCPUs is ~44 us against TCP loopback's 60-70, and a
//! 1 MiB send skips the TCP stack and its softirq work; small reads over several
//! connections are slower, though (README, "Transports"), so it is a choice, not the
//! default.
//!
//! Invariants:
//! - A unix listener's socket file is 0600 from the moment it can be connected to (bound
//!   under a temporary name, made private, renamed into place): only root, who could
//!   read the replica's files anyway, can act as its engine. That is why a unix address
//!   needs no secret, as loopback needs none.
//! - A live listener's path is never taken over: binding where a replica still answers
//!   is refused; a stale socket file left by a dead process is replaced.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The prefix of a unix-socket address.
pub const UNIX_PREFIX: &str = "unix:";

/// The socket path of a `unix:PATH` address, or `None` for a TCP one.
pub fn unix_path(addr: &str) -> Option<&Path> {
    addr.strip_prefix(UNIX_PREFIX).map(Path::new)
}

/// The send buffer asked for on a unix socket (see [`Stream::widen_send_buffer`]): room
/// for a few 1 MiB frames, as TCP's autotuning would give.
pub const UNIX_SNDBUF: libc::c_int = 4 << 20;

/// A connected replica socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `addr` (`unix:PATH` or `HOST:PORT`) within `timeout`; TCP gets
    /// TCP_NODELAY (frames are written whole, one per burst).
    pub fn connect(addr: &str, timeout: Duration) -> io::Result<Stream> {
        if let Some(p) = unix_path(addr) {
            let s = connect_unix(p, timeout).map_err(|e| io::Error::new(e.kind(), format!("{addr}: connect: {e}")))?;
            let s = Stream::Unix(s);
            s.widen_send_buffer();
            return Ok(s);
        }
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr} resolves to nothing")))?;
        let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| io::Error::new(e.kind(), format!("{addr}: connect: {e}")))?;
        s.set_nodelay(true)?;
        Ok(Stream::Tcp(s))
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// A unix socket's send buffer is fixed (212 KiB by default; TCP's grows by itself):
    /// an engine writing 1 MiB to each of three replicas would block on the first until
    /// it had read most of it, and the replicas would take turns instead of working at
    /// once (35% of both CPUs idle in a 3-replica 1 MiB write). Asks for
    /// [`UNIX_SNDBUF`], forcing past `net.core.wmem_max` where the process may (root);
    /// a smaller buffer is slower, never wrong, so failing here is only logged.
    pub fn widen_send_buffer(&self) {
        let Stream::Unix(s) = self else { return };
        let v: libc::c_int = UNIX_SNDBUF;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
            let r = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                return;
            }
        }
        tracing::debug!("cannot widen a unix socket's send buffer: {}", io::Error::last_os_error());
    }

    /// The peer, for logs: `tcp:ADDR`, or `unix:pid=N` (a unix peer has no name; its
    /// process, from SO_PEERCRED, is what an operator can look up).
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => match s.peer_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Stream::Unix(s) => match peer_pid(s.as_raw_fd()) {
                Some(pid) => format!("unix:pid={pid}"),
                None => "unix:?".into(),
            },
        }
    }

    /// Sends all of `buf`, waiting as needed.
    pub fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match sendmsg(self.as_raw_fd(), &[IoSlice::new(buf)], 0) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `sendmsg(2)` of `bufs` with `flags` (`MSG_DONTWAIT` to never wait on a descriptor
/// that stays blocking for its other users) and `MSG_NOSIGNAL` always: a peer that went
/// away must give `EPIPE`, never kill the process.
pub fn sendmsg(fd: RawFd, bufs: &[IoSlice<'_>], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is a valid "no name, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: msg points at `bufs.len()` valid iovecs that outlive the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Process id of a unix socket peer (SO_PEERCRED), if the kernel tells us.
fn peer_pid(fd: RawFd) -> Option<i32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred/len are valid for writes of the sizes given.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read_vectored(bufs),
            Stream::Unix(s) => (&*s).read_vectored(bufs),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket: a replica's, or the NBD export's. A unix one removes its socket
/// file when dropped, only while the file is still its own (same device and inode): a
/// process that has since bound the path keeps its socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix { listener: UnixListener, path: PathBuf, id: (u64, u64) },
}

impl Listener {
    /// Listens on `addr`: `unix:PATH` (see the module invariants) or `HOST:PORT`.
    pub fn bind(addr: &str) -> io::Result<Listener> {
        use std::os::unix::fs::MetadataExt;
        match unix_path(addr) {
            Some(p) => {
                let listener = bind_private_unix(p)?;
                let m = std::fs::symlink_metadata(p).map_err(|e| io::Error::new(e.kind(), format!("{}: checking the bound socket: {e}", p.display())))?;
                Ok(Listener::Unix { listener, path: p.to_path_buf(), id: (m.dev(), m.ino()) })
            }
            None => TcpListener::bind(addr).map(Listener::Tcp),
        }
    }

    /// The address clients dial: `unix:PATH`, or `IP:PORT` with the port chosen.
    pub fn local_addr(&self) -> io::Result<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()),
            Listener::Unix { path, .. } => Ok(format!("{UNIX_PREFIX}{}", path.display())),
        }
    }

    /// Whether only this host can connect: a unix socket, or TCP on loopback.
    pub fn is_host_local(&self) -> bool {
        match self {
            Listener::Tcp(l) => l.local_addr().is_ok_and(|a| a.ip().is_loopback()),
            Listener::Unix { .. } => true,
        }
    }

    /// For an accept loop that polls the listener beside a wake-up descriptor.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix { listener, .. } => listener.set_nonblocking(on),
        }
    }

    /// The next connection, blocking whatever the listener is; TCP without Nagle's delay
    /// (small frames are answered one by one).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
                // Reads of 1 MiB go back the same way.
                let s = Stream::Unix(s);
                s.widen_send_buffer();
                Ok(s)
            }
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix { listener, .. } => listener.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Listener::Unix { path, id, .. } = self {
            match std::fs::symlink_metadata(&*path) {
                Ok(m) if (m.dev(), m.ino()) == *id => {
                    if let Err(e) = std::fs::remove_file(&*path) {
                        tracing::warn!(path = %path.display(), "cannot remove the socket file: {e}");
                    }
                }
                // Gone already, or another process's socket now.
                _ => {}
            }
        }
    }
}

/// A unix connect within `timeout`. std's waits without end while the listener's
/// backlog is full (a replica stopped or hung stops accepting, and every engine retry
/// takes a slot), so the connect is made non-blocking: it succeeds or fails at once, or
/// says EAGAIN while the backlog is full, and is tried again until the deadline.
fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sa.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path does not fit a unix socket address (107 bytes, no NUL)"));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in sa.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the stream closes it.
    let s = unsafe { UnixStream::from_raw_fd(fd) };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: connect on our socket with a sockaddr_un of `len` bytes that outlives the call.
        let r = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_un).cast(), len) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, format!("not accepting connections (backlog full) for {timeout:?}")))
            }
            _ => return Err(e),
        }
    }
    s.set_nonblocking(false)?;
    Ok(s)
}

/// A socket whose `Read` is read(2) on its own descriptor, no layer between (no TLS):
/// [`read_payload`] reads its descriptor directly, which is only the same bytes then.
///
/// # Safety
/// Implement it only for a type whose `Read` is exactly read(2) on `as_raw_fd()`.
pub unsafe trait RawSocket: Read + AsRawFd {}
// SAFETY: each reads with read(2)/recv(2) on its own descriptor and nothing else.
unsafe impl RawSocket for Stream {}
// SAFETY: as above.
unsafe impl RawSocket for TcpStream {}
// SAFETY: as above.
unsafe impl RawSocket for UnixStream {}

/// Payloads at least this long (and at least the `BufReader`'s capacity) skip the
/// buffer: read(2) straight into the payload's own memory saves a copy; shorter ones
/// are taken through the buffer, whose one refill also brings the frames behind them
/// (which is what lets a reader answer a burst with one reply write).
const DIRECT_READ_MIN: usize = 64 * 1024;

/// Reads exactly `n` bytes from `rd` into `buf`, memory that is never zeroed first.
///
/// `Read::read_to_end` and `read_exact` zero memory before a plain `Read` fills it (stable
/// Rust cannot lend uninitialised memory to a `Read`); for a 1 MiB payload that was a
/// memset per replica per write. read(2) only writes
/// what it returns, so here it fills the spare capacity directly. `buf` is cleared
/// first; the end of the stream before `n` bytes is `UnexpectedEof`, with what came
/// left in `buf`.
pub fn read_payload<S: RawSocket>(rd: &mut io::BufReader<S>, n: usize, buf: &mut Vec<u8>) -> io::Result<()> {
    use std::io::BufRead;
    buf.clear();
    buf.reserve_exact(n);
    while buf.len() < n {
        let want = n - buf.len();
        if rd.buffer().is_empty() && want >= DIRECT_READ_MIN.max(rd.capacity()) {
            let spare = &mut buf.spare_capacity_mut()[..want];
            // SAFETY: read(2) writes at most `spare.len()` bytes into memory we own and
            // returns how many; only those are marked initialised below.
            let r = unsafe { libc::read(rd.get_ref().as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(payload_eof(buf.len(), n));
            }
            // SAFETY: the kernel initialised `r` (≤ want) bytes after the current length.
            unsafe { buf.set_len(buf.len() + r as usize) };
        } else {
            let b = match rd.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if b.is_empty() {
                return Err(payload_eof(buf.len(), n));
            }
            let k = b.len().min(want);
            buf.extend_from_slice(&b[..k]);
            rd.consume(k);
        }
    }
    Ok(())
}

fn payload_eof(got: usize, n: usize) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("the stream ends after {got} of {n} payload bytes"))
}

/// The longest path a unix socket address holds (`sun_path` less its NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// Checks a unix socket path without touching the filesystem: not empty, a file name
/// (not `.` or `..`), and short enough for a socket address ([`UNIX_PATH_MAX`]). For
/// callers that must refuse a bad address before doing anything else.
pub fn check_unix_path(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let len = path.as_os_str().as_bytes().len();
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty unix socket path"));
    }
    if len > UNIX_PATH_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {len} bytes, longer than the {UNIX_PATH_MAX} a unix socket address holds", path.display()),
        ));
    }
    if !path.file_name().is_some_and(|n| n != "." && n != "..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: names a directory, not a socket", path.display())));
    }
    Ok(())
}

/// Prefix of the private directories [`bind_private_unix`] binds in; the process id
/// follows, so one left by a killed process can be told from one in use.
const BIND_DIR_PREFIX: &str = ".lh-sock-";

/// Binds a unix socket at `path` that only its owner (root, for every socket of this
/// project) may connect to. The one place the project makes a listening unix socket:
/// replicas, the engine's control socket, the NBD export and the CSI endpoint use it.
///
/// - A path [`check_unix_path`] refuses is refused with its reason.
/// - A missing parent directory is made, mode 0700; an existing one is left as it is.
/// - Something other than a socket at `path` is refused; a socket a process answers on
///   (or that accepts nothing within a second: a stopped process with a full backlog)
///   is refused (`AddrInUse`); a dead process's socket is removed.
/// - The socket is bound in a fresh mode-0700 directory beside `path`, made 0600 and
///   moved into place with `RENAME_NOREPLACE`, so no umask and no moment leaves it open
///   to others, and of two processes binding one path at once the second is refused
///   instead of silently replacing the first's socket. The directory is reached through
///   `/proc/self/fd` when its path would not fit a socket address, so any `path` that
///   fits can be bound. Such directories left by killed processes are removed.
pub fn bind_private_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let ctx = |what: &str, e: io::Error| io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()));
    check_unix_path(path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| ctx("creating its directory", e))?;
    }
    sweep_bind_dirs(dir);
    let in_use = || io::Error::new(io::ErrorKind::AddrInUse, format!("{}: another process listens on this socket", path.display()));
    // Whether a socket file at `path` is held by a live process; a dead one's is removed.
    let clear = || -> io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: exists and is not a socket", path.display())))
            }
            Ok(_) => match connect_unix(path, Duration::from_secs(1)) {
                Ok(_) => Err(in_use()),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(in_use()),
                Err(_) => match std::fs::remove_file(path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(ctx("removing a dead process's socket", e)),
                },
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ctx("checking", e)),
        }
    };
    clear()?;
    let mut r = [0u8; 4];
    crate::auth::fill_random(&mut r)?;
    let tmp = dir.join(format!("{BIND_DIR_PREFIX}{}-{}", std::process::id(), crate::auth::hex(&r)));
    std::fs::DirBuilder::new().mode(0o700).create(&tmp).map_err(|e| ctx("making a private directory beside it", e))?;
    let inner = tmp.join("s");
    let bound = (|| {
        let l = if inner.as_os_str().as_bytes().len() <= UNIX_PATH_MAX {
            UnixListener::bind(&inner)
        } else {
            let d = std::fs::File::open(&tmp)?;
            UnixListener::bind(format!("/proc/self/fd/{}/s", d.as_raw_fd()))
        }
        .map_err(|e| ctx("binding", e))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600)).map_err(|e| ctx("making the socket private", e))?;
        // A socket another process placed since `clear` is checked again, once: a live
        // one refuses us, a dead one is removed and the move tried again.
        match rename_noreplace(&inner, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                clear()?;
                rename_noreplace(&inner, path).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => in_use(),
                    _ => ctx("moving the socket into place", e),
                })?
            }
            r => r.map_err(|e| ctx("moving the socket into place", e))?,
        }
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&tmp);
    bound
}

/// rename(2) that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"));
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the private bind directories (and the socket in one) that processes killed
/// mid-bind left in `dir`; ones whose process lives are left alone.
fn sweep_bind_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(BIND_DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let alive = pid == std::process::id() as i32 || unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if !alive {
            let _ = std::fs::remove_file(e.path().join("s"));
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn unix_listener_is_private_and_never_takes_a_live_path() {
        let d = std::env::temp_dir().join(format!("lh-net-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("r.sock");
        let addr = format!("unix:{}", p.display());
        let l = Listener::bind(&addr).unwrap();
        assert_eq!(l.local_addr().unwrap(), addr);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let mut c = Stream::connect(&addr, Duration::from_secs(1)).unwrap();
        let mut s = l.accept().unwrap();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        let e = Listener::bind(&addr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop((c, s, l));
        assert!(!p.exists(), "a listener removes its own socket file when dropped");
        // A dead process's socket (std's listener leaves its file behind) is replaced.
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists());
        let l2 = Listener::bind(&addr).unwrap();
        // A file that is no longer the listener's own is left alone.
        std::fs::remove_file(&p).unwrap();
        drop(UnixListener::bind(&p).unwrap());
        drop(l2);
        assert!(p.exists(), "a dropped listener removed a socket it had not made");
        // A listener that stops accepting (a stopped replica) with its backlog full: the
        // connect gives up at its deadline instead of waiting for ever.
        let full = d.join("full.sock");
        let lf = Listener::bind(&format!("unix:{}", full.display())).unwrap();
        let Listener::Unix { listener: ul, .. } = &lf else { unreachable!() };
        // SAFETY: listen(2) again on our own socket only changes its backlog.
        assert_eq!(unsafe { libc::listen(ul.as_raw_fd(), 0) }, 0);
        let faddr = format!("unix:{}", full.display());
        let mut held = Vec::new();
        let err = loop {
            match Stream::connect(&faddr, Duration::from_millis(200)) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 16, "the backlog never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        // Its path is still not taken over: a stopped process may go on.
        let e = Listener::bind(&faddr).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop((held, lf));
        std::fs::write(d.join("plain"), b"x").unwrap();
        let e = Listener::bind(&format!("unix:{}", d.join("plain").display())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unix_listener_takes_any_path_that_fits_and_names_what_does_not() {
        let d = std::env::temp_dir().join(format!("lh-net-len-{}", std::process::id()));
        let e = bind_private_unix(Path::new("")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("empty"), "{e}");
        // A path of exactly 107 bytes, in directories that do not exist yet: its
        // temporary name is longer than 107, so it is bound through /proc/self/fd.
        let base = d.join("sub");
        let pad = UNIX_PATH_MAX - base.as_os_str().len() - 1;
        let p = base.join("x".repeat(pad));
        assert_eq!(p.as_os_str().len(), UNIX_PATH_MAX);
        let l = Listener::bind(&format!("unix:{}", p.display())).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        let mut c = Stream::connect(&l.local_addr().unwrap(), Duration::from_secs(1)).unwrap();
        let mut s = l.accept().unwrap();
        c.write_all(b"long").unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"long");
        // Nothing but the socket is left beside it.
        let names: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let too_long = base.join("y".repeat(pad + 1));
        let e = bind_private_unix(&too_long).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("108 bytes"), "{e}");
        assert!(!too_long.exists());
        drop((c, s, l));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn payloads_read_whole_whether_buffered_direct_or_split() {
        let (a, b) = UnixStream::pair().unwrap();
        // Frames of 10 bytes, 100 KiB, 4 KiB and 1 MiB, written in odd-sized pieces.
        let sizes = [10usize, 100 << 10, 4 << 10, 1 << 20];
        let data: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(k, &n)| (0..n).map(|i| (i * 31 + k) as u8).collect()).collect();
        let all: Vec<u8> = data.concat();
        let w = std::thread::spawn(move || {
            let mut a = a;
            for piece in all.chunks(77_777) {
                a.write_all(piece).unwrap();
            }
            a.write_all(b"tail").unwrap();
        });
        let mut rd = io::BufReader::with_capacity(8 << 10, b);
        for (want, &n) in data.iter().zip(&sizes) {
            let mut got = Vec::new();
            read_payload(&mut rd, n, &mut got).unwrap();
            assert!(got == *want, "payload of {n} bytes differs");
        }
        w.join().unwrap();
        let mut got = Vec::new();
        let e = read_payload(&mut rd, 1 << 20, &mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"tail");
        assert!(e.to_string().contains("after 4 of 1048576"), "{e}");
    }

    #[test]
    fn a_bind_never_replaces_a_socket_and_sweeps_what_killed_binds_left() {
        let d = std::env::temp_dir().join(format!("lh-net-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        // What a process killed mid-bind leaves, and what one binding right now has.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let left = d.join(format!("{BIND_DIR_PREFIX}{dead}-00000000"));
        let busy = d.join(format!("{BIND_DIR_PREFIX}{}-00000000", std::process::id()));
        for x in [&left, &busy] {
            std::fs::create_dir_all(x).unwrap();
            std::fs::write(x.join("s"), b"").unwrap();
        }
        let p = d.join("a.sock");
        let _l = bind_private_unix(&p).unwrap();
        assert!(!left.exists(), "a dead process's bind directory stays");
        assert!(busy.exists(), "a live process's bind directory was removed");
        // The move into place never replaces: a socket placed at the path meanwhile
        // (another process binding at the same moment) makes it fail, not vanish.
        let other = d.join("b.sock");
        std::fs::write(&other, b"x").unwrap();
        let e = rename_noreplace(&busy.join("s"), &other).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
