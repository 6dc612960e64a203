//! The listener and the life of a connection: accept, handshake, transmission, close.
//!
//! Every connection has its own thread (plus a reply thread during transmission), so
//! a slow, stuck or malicious client only ever holds up itself.

use super::handshake::{negotiate, HandshakeError, HANDSHAKE_TIMEOUT};
use longhorn_replica::net::{Listener, Stream};
use super::transmission::{linger, serve};
use longhorn_engine::api::BlockBackend;
use std::io::{self, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Size of the per-connection read buffer: several maximal pipelined requests.
const READ_BUFFER: usize = 256 * 1024;

/// An NBD server for one volume, bound but not yet accepting.
pub struct NbdServer {
    listener: Listener,
    backend: Arc<dyn BlockBackend>,
    uri: String,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

fn with_context(e: io::Error, ctx: String) -> io::Error {
    io::Error::new(e.kind(), format!("{ctx}: {e}"))
}

impl NbdServer {
    /// `listen` is "unix:/path/to.sock" or "tcp:HOST:PORT" (port 0 = pick one). A stale
    /// unix socket file is replaced.
    pub fn bind(listen: &str, backend: Arc<dyn BlockBackend>) -> io::Result<NbdServer> {
        let (listener, uri) = if let Some(path) = listen.strip_prefix("unix:") {
            bind_unix(Path::new(path))?
        } else if let Some(addr) = listen.strip_prefix("tcp:") {
            bind_tcp(addr)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listen address '{listen}' must start with 'unix:' or 'tcp:'"),
            ));
        };
        Ok(NbdServer {
            listener,
            backend,
            uri,
        })
    }

    /// URI a client uses: "nbd+unix:///?socket=/path" or "nbd://127.0.0.1:PORT/".
    pub fn uri(&self) -> String {
        self.uri.clone()
    }

    /// Accept connections on a background thread; returns a handle that stops accepting
    /// and closes the listener (and removes the unix socket file) when `shutdown()` is
    /// called or dropped. Connections already accepted keep running until their
    /// clients disconnect.
    pub fn spawn(self) -> io::Result<NbdServerHandle> {
        let (wake_rd, wake_wr) = pipe().map_err(|e| with_context(e, "creating a pipe".into()))?;
        self.listener.set_nonblocking(true)?;
        let uri = self.uri.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".to_string())
            .spawn(move || self.accept_loop(wake_rd))
            .map_err(|e| with_context(e, "starting the NBD accept thread".into()))?;
        info!(uri = %uri, "NBD server listening");
        Ok(NbdServerHandle {
            uri,
            wake: Some(wake_wr),
            thread: Some(thread),
        })
    }

    fn accept_loop(self, wake: OwnedFd) {
        let next_id = AtomicU64::new(1);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of 2 pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(uri = %self.uri, "poll on the NBD listener failed: {e}; stopping");
                return;
            }
            if fds[1].revents != 0 {
                debug!(uri = %self.uri, "NBD listener shutting down");
                return;
            }
            if fds[0].revents == 0 {
                continue;
            }
            loop {
                match self.listener.accept() {
                    Ok(stream) => {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        self.start_connection(stream, id);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(uri = %self.uri, "accepting an NBD connection failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }

    fn start_connection(&self, stream: Stream, id: u64) {
        let backend = self.backend.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || handle_connection(stream, backend));
        if let Err(e) = spawned {
            warn!(uri = %self.uri, "cannot start a thread for a new NBD connection: {e}; dropped");
        }
    }
}

/// Stops the accept thread when shut down or dropped.
pub struct NbdServerHandle {
    uri: String,
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServerHandle")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl NbdServerHandle {
    /// URI a client uses to connect.
    pub fn uri(&self) -> String {
        self.uri.clone()
    }

    /// Stop accepting, close the listener and remove the unix socket file. Returns once
    /// the accept thread has exited.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Closing the write end of the pipe wakes the accept thread's poll.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!(uri = %self.uri, "NBD accept thread panicked");
            }
        }
        info!(uri = %self.uri, "NBD server stopped accepting connections");
    }
}

impl Drop for NbdServerHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn bind_unix(path: &Path) -> io::Result<(Listener, String)> {
    // Root only (mode 0600), like the engine's control socket; a live server's socket
    // is refused, a stale one replaced; the listener removes its file when it stops.
    let listener = Listener::bind(&format!("{}{}", longhorn_replica::net::UNIX_PREFIX, path.display()))
        .map_err(|e| with_context(e, "binding the NBD socket".into()))?;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let uri = format!(
        "nbd+unix:///?socket={}",
        percent_encode(&abs.to_string_lossy())
    );
    Ok((listener, uri))
}

fn bind_tcp(addr: &str) -> io::Result<(Listener, String)> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| with_context(e, format!("resolving '{addr}' (expected HOST:PORT)")))?
        .collect();
    let listener = TcpListener::bind(&addrs[..])
        .map_err(|e| with_context(e, format!("binding TCP {addr}")))?;
    let local = listener.local_addr()?;
    // A wildcard address is not something to connect to; loopback is.
    let host = match local {
        SocketAddr::V4(a) if a.ip().is_unspecified() => "127.0.0.1".to_string(),
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) if a.ip().is_unspecified() => "[::1]".to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let uri = format!("nbd://{host}:{}/", local.port());
    Ok((Listener::Tcp(listener), uri))
}

/// Percent-encode a socket path for the query part of an NBD URI.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Serves one client already connected on `stream` (handshake, transmission, close) on
/// the calling thread. The fuzz targets drive whole connections through a socketpair
/// with it; every accepted socket takes the same path.
pub fn serve_unix_connection(stream: UnixStream, backend: Arc<dyn BlockBackend>) {
    handle_connection(Stream::Unix(stream), backend)
}

fn handle_connection(stream: Stream, backend: Arc<dyn BlockBackend>) {
    let peer = stream.peer();
    info!(peer = %peer, volume = backend.name(), "NBD client connected");
    let reader_stream = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            warn!(peer = %peer, "cannot duplicate the socket: {e}; closing");
            return;
        }
    };
    let mut rd = BufReader::with_capacity(READ_BUFFER, reader_stream);
    let timeouts = |t: Option<Duration>| {
        stream
            .set_read_timeout(t)
            .and_then(|_| stream.set_write_timeout(t))
    };
    if let Err(e) = timeouts(Some(HANDSHAKE_TIMEOUT)) {
        warn!(peer = %peer, "cannot set socket timeouts: {e}; closing");
        return;
    }
    let ready = match negotiate(&peer, &backend, &stream, &mut rd) {
        Ok(r) => r,
        Err(e) => {
            match &e {
                HandshakeError::Aborted | HandshakeError::Closed => {
                    info!(peer = %peer, "NBD client disconnected: {e}")
                }
                HandshakeError::Timeout(_)
                | HandshakeError::Io { .. }
                | HandshakeError::Protocol(_) => {
                    warn!(peer = %peer, "NBD handshake failed: {e}; closing the connection")
                }
            }
            if matches!(e, HandshakeError::Protocol(_)) {
                linger(&stream, &mut rd);
            }
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    if let Err(e) = timeouts(None) {
        warn!(peer = %peer, "cannot clear socket timeouts: {e}; closing");
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    debug!(peer = %peer, base_allocation = ready.base_allocation, "NBD transmission phase");
    serve(
        ready.conn,
        ready.session,
        &mut rd,
        backend.size(),
        ready.base_allocation,
    );
}

#[cfg(test)]
mod tests {
    use super::percent_encode;

    #[test]
    fn encodes_socket_paths() {
        assert_eq!(percent_encode("/tmp/a b&c.sock"), "/tmp/a%20b%26c.sock");
        assert_eq!(
            percent_encode("/run/lh/vol-1_x.sock"),
            "/run/lh/vol-1_x.sock"
        );
    }
}
