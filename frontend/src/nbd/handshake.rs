//! Fixed newstyle negotiation, up to the point where transmission starts.

use longhorn_replica::net::Stream;
use super::proto::*;
use super::transmission::Conn;
use bytes::BufMut;
use longhorn_engine::api::{BlockBackend, Completer, Session};
use std::io::{self, BufReader, Read};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// Why negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("client aborted the negotiation (NBD_OPT_ABORT)")]
    Aborted,
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
}

/// A client must finish each handshake step (one read or write) within this time.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> HandshakeError {
    move |source| match source.kind() {
        io::ErrorKind::UnexpectedEof => HandshakeError::Closed,
        // SO_RCVTIMEO/SO_SNDTIMEO expiring shows up as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HandshakeError::Timeout(HANDSHAKE_TIMEOUT)
        }
        _ => HandshakeError::Io { what, source },
    }
}

/// The outcome of a successful negotiation.
pub(crate) struct Ready {
    pub conn: Arc<Conn>,
    pub session: Box<dyn Session>,
    pub base_allocation: bool,
}

/// A cursor over option data; every getter fails on short data.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed string of at most MAX_STRING_LEN bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return None;
        }
        self.bytes(len)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Negotiation<'a> {
    peer: &'a str,
    backend: &'a Arc<dyn BlockBackend>,
    sock: &'a Stream,
    rd: &'a mut BufReader<Stream>,
    no_zeroes: bool,
    structured: bool,
    base_allocation: bool,
    /// Replies for the current option, sent in one write.
    out: Vec<u8>,
}

/// Run the handshake on a fresh connection. `Ok` means transmission starts now.
pub(crate) fn negotiate(
    peer: &str,
    backend: &Arc<dyn BlockBackend>,
    sock: &Stream,
    rd: &mut BufReader<Stream>,
) -> Result<Ready, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(HANDSHAKE_FLAGS);
    sock.send_all(&greeting)
        .map_err(io_err("sending the greeting"))?;

    let mut cf = [0u8; 4];
    rd.read_exact(&mut cf)
        .map_err(io_err("reading client flags"))?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(HandshakeError::Protocol(format!(
            "client flags {client_flags:#x} contain unknown bits {:#x}",
            client_flags & !KNOWN_CLIENT_FLAGS
        )));
    }
    if client_flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        // Such a client only ever sends NBD_OPT_EXPORT_NAME, which works the same.
        debug!(peer, "client did not set NBD_FLAG_C_FIXED_NEWSTYLE");
    }
    let mut n = Negotiation {
        peer,
        backend,
        sock,
        rd,
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        base_allocation: false,
        out: Vec::with_capacity(256),
    };
    loop {
        if let Some(ready) = n.option()? {
            return Ok(ready);
        }
    }
}

impl Negotiation<'_> {
    fn send(&mut self) -> Result<(), HandshakeError> {
        let r = self.sock.send_all(&self.out);
        self.out.clear();
        r.map_err(io_err("sending an option reply"))
    }

    fn reply(&mut self, opt: u32, typ: u32, data: &[u8]) {
        put_opt_reply(&mut self.out, opt, typ, data);
    }

    /// Queue an error reply (and log why).
    fn error(&mut self, opt: u32, typ: u32, msg: &str) {
        warn!(
            peer = self.peer,
            option = opt_name(opt),
            "rejecting option: {msg}"
        );
        put_opt_reply(&mut self.out, opt, typ, msg.as_bytes());
    }

    fn known_export(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.backend.name().as_bytes()
    }

    fn unknown_export(&mut self, opt: u32, name: &[u8]) {
        let msg = format!(
            "unknown export '{}' (this server exports '{}')",
            String::from_utf8_lossy(name),
            self.backend.name()
        );
        self.error(opt, NBD_REP_ERR_UNKNOWN, &msg);
    }

    /// Handle one option. `Some` when transmission starts.
    fn option(&mut self) -> Result<Option<Ready>, HandshakeError> {
        let mut hdr = [0u8; 16];
        self.rd
            .read_exact(&mut hdr)
            .map_err(io_err("reading an option header"))?;
        let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap_or([0; 8]));
        let opt = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#018x} (expected IHAVEOPT)"
            )));
        }
        if len > MAX_OPTION_LEN {
            // Skip the data without buffering it, then refuse the option.
            let skipped = io::copy(&mut (&mut *self.rd).take(u64::from(len)), &mut io::sink())
                .map_err(io_err("skipping oversized option data"))?;
            if skipped < u64::from(len) {
                return Err(HandshakeError::Closed);
            }
            if opt == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with {len} bytes of data (limit {MAX_OPTION_LEN})"
                )));
            }
            let msg = format!("option data of {len} bytes exceeds the limit of {MAX_OPTION_LEN}");
            self.error(opt, NBD_REP_ERR_INVALID, &msg);
            self.send()?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.rd
            .read_exact(&mut data)
            .map_err(io_err("reading option data"))?;
        debug!(peer = self.peer, option = opt_name(opt), len, "option");

        let ready = match opt {
            NBD_OPT_EXPORT_NAME => return self.export_name(&data).map(Some),
            NBD_OPT_ABORT => {
                self.reply(opt, NBD_REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = self.send();
                return Err(HandshakeError::Aborted);
            }
            NBD_OPT_LIST => {
                if data.is_empty() {
                    let name = self.backend.name().as_bytes().to_vec();
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.put_u32(name.len() as u32);
                    d.put_slice(&name);
                    self.reply(opt, NBD_REP_SERVER, &d);
                    self.reply(opt, NBD_REP_ACK, &[]);
                } else {
                    self.error(opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                None
            }
            NBD_OPT_INFO | NBD_OPT_GO => self.info_or_go(opt, &data)?,
            NBD_OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    self.reply(opt, NBD_REP_ACK, &[]);
                } else {
                    self.error(
                        opt,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                None
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(opt, &data);
                None
            }
            _ => {
                // STARTTLS (we run in NOTLS mode), EXTENDED_HEADERS and anything unknown.
                let msg = format!("option {opt} ({}) is not supported", opt_name(opt));
                debug!(peer = self.peer, "{msg}");
                put_opt_reply(&mut self.out, opt, NBD_REP_ERR_UNSUP, msg.as_bytes());
                None
            }
        };
        self.send()?;
        Ok(ready)
    }

    fn export_flags(&self) -> u16 {
        TRANSMISSION_FLAGS
    }

    /// Open the engine session for the transmission phase.
    fn open(&self) -> io::Result<Ready> {
        let sock = self.sock.try_clone()?;
        let conn = Arc::new(Conn::new(self.peer.to_string(), sock, self.structured));
        let completer: Arc<dyn Completer> = conn.clone();
        let session = self.backend.open_session(completer)?;
        Ok(Ready {
            conn,
            session,
            base_allocation: self.base_allocation,
        })
    }

    fn export_name(&mut self, name: &[u8]) -> Result<Ready, HandshakeError> {
        if !self.known_export(name) {
            // This option cannot be answered with an error: the spec says hang up.
            return Err(HandshakeError::Protocol(format!(
                "NBD_OPT_EXPORT_NAME for unknown export '{}'",
                String::from_utf8_lossy(name)
            )));
        }
        let ready = self.open().map_err(io_err("opening an engine session"))?;
        self.out.put_u64(self.backend.size());
        self.out.put_u16(self.export_flags());
        if !self.no_zeroes {
            self.out.put_bytes(0, 124);
        }
        self.send()?;
        Ok(ready)
    }

    /// NBD_OPT_INFO / NBD_OPT_GO. Data: name (u32 length + bytes), u16 count, count u16
    /// info requests.
    fn info_or_go(&mut self, opt: u32, data: &[u8]) -> Result<Option<Ready>, HandshakeError> {
        let mut c = Cur(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut reqs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            c.is_empty().then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.error(
                opt,
                NBD_REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return Ok(None);
        };
        if !self.known_export(name) {
            self.unknown_export(opt, name);
            return Ok(None);
        }
        let ready = if opt == NBD_OPT_GO {
            match self.open() {
                Ok(r) => Some(r),
                Err(e) => {
                    let msg = format!("cannot open the volume: {e}");
                    self.error(opt, NBD_REP_ERR_SHUTDOWN, &msg);
                    return Ok(None);
                }
            }
        } else {
            None
        };

        let mut d = Vec::with_capacity(12);
        d.put_u16(NBD_INFO_EXPORT);
        d.put_u64(self.backend.size());
        d.put_u16(self.export_flags());
        self.reply(opt, NBD_REP_INFO, &d);
        let export_name = self.backend.name().to_string();
        if reqs.contains(&NBD_INFO_NAME) {
            let mut d = Vec::new();
            d.put_u16(NBD_INFO_NAME);
            d.put_slice(truncate_utf8(&export_name, MAX_STRING_LEN).as_bytes());
            self.reply(opt, NBD_REP_INFO, &d);
        }
        if reqs.contains(&NBD_INFO_DESCRIPTION) {
            let desc = format!("Longhorn volume {export_name}");
            let mut d = Vec::new();
            d.put_u16(NBD_INFO_DESCRIPTION);
            d.put_slice(truncate_utf8(&desc, MAX_STRING_LEN).as_bytes());
            self.reply(opt, NBD_REP_INFO, &d);
        }
        // Always sent: the client learns our limits even if it did not ask, and a
        // minimum of 1 imposes nothing on clients that ignore it.
        let mut d = Vec::with_capacity(14);
        d.put_u16(NBD_INFO_BLOCK_SIZE);
        d.put_u32(MIN_BLOCK_SIZE);
        d.put_u32(PREFERRED_BLOCK_SIZE);
        d.put_u32(MAX_PAYLOAD);
        self.reply(opt, NBD_REP_INFO, &d);
        self.reply(opt, NBD_REP_ACK, &[]);
        Ok(ready)
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. Data: export name, u32
    /// number of queries, queries (each u32 length + bytes).
    fn meta_context(&mut self, opt: u32, data: &[u8]) {
        if !self.structured {
            self.error(
                opt,
                NBD_REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
            return;
        }
        let mut c = Cur(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.string()?);
            }
            c.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            self.error(
                opt,
                NBD_REP_ERR_INVALID,
                "malformed metadata context request",
            );
            return;
        };
        if queries.iter().any(|q| std::str::from_utf8(q).is_err()) {
            self.error(
                opt,
                NBD_REP_ERR_INVALID,
                "metadata context query is not UTF-8",
            );
            return;
        }
        if !self.known_export(name) {
            self.unknown_export(opt, name);
            return;
        }
        let exact = queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes());
        let mut ctx = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        if opt == NBD_OPT_SET_META_CONTEXT {
            // Replaces whatever was selected before.
            self.base_allocation = exact;
            if exact {
                ctx.put_u32(BASE_ALLOCATION_ID);
                ctx.put_slice(BASE_ALLOCATION.as_bytes());
                self.reply(opt, NBD_REP_META_CONTEXT, &ctx);
            }
        } else {
            // No query lists everything; "base:" lists the whole namespace.
            let listed = queries.is_empty() || exact || queries.iter().any(|q| *q == b"base:");
            if listed {
                ctx.put_u32(0);
                ctx.put_slice(BASE_ALLOCATION.as_bytes());
                self.reply(opt, NBD_REP_META_CONTEXT, &ctx);
            }
        }
        self.reply(opt, NBD_REP_ACK, &[]);
    }
}
