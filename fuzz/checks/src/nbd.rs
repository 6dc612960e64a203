//! NBD: whole client connections to the real server code (handshake state machine,
//! option lengths, request headers and payloads, replies), through a socketpair.
//!
//! The fuzz input is everything a client sends after the server's greeting. A helper
//! thread writes it, closes its sending side and reads everything the server answers,
//! while the server serves the connection on the calling thread against an in-memory
//! backend that completes each request inline, deterministically. Inline completion
//! makes replies come back in request order, so the answer can be checked against a
//! model of the protocol: every option gets replies for that option ending in ACK or
//! an error, every request exactly one well-formed reply with its handle, and nothing
//! else is sent.

use bytes::Bytes;
use longhorn_engine::api::{BlockBackend, Completer, Extent, IoOp, IoResult, Session};
use longhorn_frontend::nbd::proto::*;
use longhorn_frontend::nbd::server::serve_unix_connection;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

const EXPORT: &str = "fuzz";
/// Small, so that in-range READs (whose data is sent back) stay cheap.
const EXPORT_SIZE: u64 = 64 * 1024;
/// Longest option reply the server may send: an error naming a 4096-byte export.
const MAX_REPLY_DATA: u32 = 16 * 1024;

struct Backend;

impl BlockBackend for Backend {
    fn name(&self) -> &str {
        EXPORT
    }
    fn size(&self) -> u64 {
        EXPORT_SIZE
    }
    fn open_session(&self, completer: Arc<dyn Completer>) -> std::io::Result<Box<dyn Session>> {
        Ok(Box::new(Inline(completer)))
    }
}

/// Completes every request inside `submit`. What it answers depends only on the
/// request, and covers errors, and results the engine should never give (wrong data
/// length, odd extents), so the server's handling of those is fuzzed too.
struct Inline(Arc<dyn Completer>);

impl Session for Inline {
    fn submit(&self, tag: u64, op: IoOp) {
        let r = match op {
            IoOp::Read { offset, len } => match offset % 13 {
                3 => IoResult::Err(libc::EIO),
                5 => IoResult::Data(Bytes::from(vec![0u8; len as usize + 1])),
                7 => IoResult::Done,
                _ => IoResult::Data(Bytes::from(vec![0xa5u8; len as usize])),
            },
            IoOp::BlockStatus { offset, len } => match offset % 11 {
                3 => IoResult::Err(libc::EIO),
                4 => IoResult::Extents(Vec::new()),
                5 => IoResult::Done,
                k => IoResult::Extents(
                    (0..k + 1)
                        .map(|i| Extent {
                            len: match i % 3 {
                                0 => len / 3,
                                1 => 0,
                                _ => len,
                            },
                            hole: (offset >> i) & 1 == 1,
                        })
                        .collect(),
                ),
            },
            IoOp::Write { offset, .. }
            | IoOp::WriteZeroes { offset, .. }
            | IoOp::Trim { offset, .. } => match offset % 13 {
                3 => IoResult::Err(libc::ENOSPC),
                4 => IoResult::Err(libc::EDQUOT),
                5 => IoResult::Data(Bytes::new()),
                _ => IoResult::Done,
            },
            IoOp::Flush => IoResult::Done,
        };
        self.0.complete(tag, r);
    }
    fn push(&self) {}
}

/// One client: its end of the socketpair and the bytes to send.
type Job = (UnixStream, Vec<u8>);

/// The client side runs on one long-lived thread (a thread per input would cost
/// more than most inputs).
struct Client {
    jobs: Sender<Job>,
    answers: Receiver<Vec<u8>>,
}

fn client_loop(jobs: Receiver<Job>, answers: Sender<Vec<u8>>) {
    for (mut sock, input) in jobs {
        // The server may hang up before reading everything: a normal outcome.
        let _ = sock.write_all(&input);
        let _ = sock.shutdown(Shutdown::Write);
        let mut out = Vec::new();
        let _ = sock.read_to_end(&mut out);
        if answers.send(out).is_err() {
            return;
        }
    }
}

fn client() -> &'static Mutex<Client> {
    static C: OnceLock<Mutex<Client>> = OnceLock::new();
    C.get_or_init(|| {
        // libFuzzer's main is not Rust's: nothing has ignored SIGPIPE, and a write to
        // a socket the server closed must fail, not kill the fuzzer.
        // SAFETY: setting a signal to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let (jtx, jrx) = channel();
        let (atx, arx) = channel();
        std::thread::Builder::new()
            .name("nbd-fuzz-client".into())
            .spawn(move || client_loop(jrx, atx))
            .expect("start the client thread");
        Mutex::new(Client { jobs: jtx, answers: arx })
    })
}

/// Runs one connection: `input` from the client, returns what the server sent.
fn converse(input: &[u8]) -> Vec<u8> {
    let c = client().lock().unwrap_or_else(|e| e.into_inner());
    let (server, client) = UnixStream::pair().expect("socketpair");
    c.jobs.send((client, input.to_vec())).expect("client thread alive");
    serve_unix_connection(server, Arc::new(Backend));
    c.answers.recv().expect("client thread answers")
}

/// Reads the server's output in order; running past its end is a failed check.
struct Out<'a> {
    b: &'a [u8],
}

impl<'a> Out<'a> {
    fn take(&mut self, n: usize, what: &str) -> &'a [u8] {
        assert!(self.b.len() >= n, "server output ends inside {what}: {} of {n} bytes", self.b.len());
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        a
    }
    fn u16(&mut self, what: &str) -> u16 {
        let b = self.take(2, what);
        u16::from_be_bytes([b[0], b[1]])
    }
    fn u32(&mut self, what: &str) -> u32 {
        let b = self.take(4, what);
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    fn u64(&mut self, what: &str) -> u64 {
        let b = self.take(8, what);
        u64::from_be_bytes(b.try_into().expect("8 bytes"))
    }
    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// What the client's bytes say, read the way the server must read them.
struct In<'a> {
    b: &'a [u8],
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            self.b = &[];
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
}

/// What negotiation left in force for the transmission phase.
#[derive(Default)]
struct Agreed {
    structured: bool,
    base_allocation: bool,
}

/// Checks the whole conversation: greeting, options, and (if negotiation succeeded)
/// the transmission phase.
fn check(input: &[u8], output: &[u8]) {
    let mut out = Out { b: output };
    assert_eq!(out.u64("the greeting"), NBDMAGIC);
    assert_eq!(out.u64("the greeting"), IHAVEOPT);
    assert_eq!(out.u16("the greeting"), HANDSHAKE_FLAGS);
    let mut inp = In { b: input };
    let Some(cf) = inp.take(4) else {
        assert!(out.is_empty(), "server answered a client that sent no flags");
        return;
    };
    let client_flags = u32::from_be_bytes([cf[0], cf[1], cf[2], cf[3]]);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        assert!(out.is_empty(), "server answered a client with unknown flags {client_flags:#x}");
        return;
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut agreed = Agreed::default();
    loop {
        let Some(h) = inp.take(16) else { break };
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if magic != IHAVEOPT {
            break;
        }
        if inp.take(len as usize).is_none() {
            // Short option data: the server can only hang up.
            break;
        }
        if len > MAX_OPTION_LEN {
            if opt == NBD_OPT_EXPORT_NAME {
                break;
            }
            let (typ, _) = option_replies(&mut out, opt);
            assert_eq!(typ, NBD_REP_ERR_INVALID, "oversized option {opt} answered with {typ:#x}");
            continue;
        }
        if opt == NBD_OPT_EXPORT_NAME {
            if out.is_empty() {
                // Unknown export: hanging up is the only answer the option allows.
                break;
            }
            assert_eq!(out.u64("the EXPORT_NAME answer"), EXPORT_SIZE);
            assert_eq!(out.u16("the EXPORT_NAME answer"), TRANSMISSION_FLAGS);
            if !no_zeroes {
                assert!(out.take(124, "the EXPORT_NAME padding").iter().all(|&b| b == 0));
            }
            transmission(inp.b, &mut out, &agreed);
            return;
        }
        let (typ, meta_contexts) = option_replies(&mut out, opt);
        match opt {
            NBD_OPT_ABORT => {
                assert_eq!(typ, NBD_REP_ACK, "ABORT answered with {typ:#x}");
                break;
            }
            NBD_OPT_STRUCTURED_REPLY if typ == NBD_REP_ACK => agreed.structured = true,
            NBD_OPT_SET_META_CONTEXT if typ == NBD_REP_ACK => agreed.base_allocation = meta_contexts > 0,
            NBD_OPT_GO if typ == NBD_REP_ACK => {
                transmission(inp.b, &mut out, &agreed);
                return;
            }
            _ => {}
        }
    }
    assert!(out.is_empty(), "server sent {} bytes nobody asked for", out.b.len());
}

/// Reads the replies to option `opt` up to the final one; returns its type and how
/// many META_CONTEXT replies came before it.
fn option_replies(out: &mut Out, opt: u32) -> (u32, usize) {
    let mut meta = 0;
    loop {
        assert_eq!(out.u64("an option reply"), OPT_REPLY_MAGIC);
        assert_eq!(out.u32("an option reply"), opt, "reply for another option");
        let typ = out.u32("an option reply");
        let len = out.u32("an option reply");
        assert!(len <= MAX_REPLY_DATA, "option reply of {len} bytes");
        let data = out.take(len as usize, "option reply data");
        if typ == NBD_REP_ACK || typ & (1 << 31) != 0 {
            if typ == NBD_REP_ACK {
                assert!(data.is_empty(), "ACK with data");
            }
            return (typ, meta);
        }
        match typ {
            NBD_REP_SERVER => assert_eq!(opt, NBD_OPT_LIST),
            NBD_REP_INFO => {
                assert!(opt == NBD_OPT_INFO || opt == NBD_OPT_GO);
                assert!(data.len() >= 2, "INFO reply without a type");
            }
            NBD_REP_META_CONTEXT => {
                assert!(opt == NBD_OPT_LIST_META_CONTEXT || opt == NBD_OPT_SET_META_CONTEXT);
                assert!(data.len() > 4, "META_CONTEXT reply without a name");
                meta += 1;
            }
            other => panic!("unexpected reply type {other:#x} for option {opt}"),
        }
    }
}

/// A request the server must answer, in order.
struct Expect {
    req: Request,
}

/// The model of the transmission phase: which requests get a reply, then the check
/// that each reply is well formed and for that request, and that nothing else is sent.
fn transmission(mut input: &[u8], out: &mut Out, agreed: &Agreed) {
    let mut expected = Vec::new();
    while input.len() >= REQUEST_HEADER_LEN {
        let (h, rest) = input.split_at(REQUEST_HEADER_LEN);
        input = rest;
        let Ok(req) = Request::parse(h.try_into().expect("header length")) else { break };
        if req.typ == NBD_CMD_DISC {
            break;
        }
        if req.typ == NBD_CMD_WRITE {
            if req.len > MAX_PAYLOAD {
                // Answered, then the connection is closed: the payload cannot be skipped.
                expected.push(Expect { req });
                break;
            }
            if input.len() < req.len as usize {
                break;
            }
            input = &input[req.len as usize..];
        }
        expected.push(Expect { req });
    }
    for e in &expected {
        reply(out, &e.req, agreed.structured);
    }
    assert!(out.is_empty(), "{} bytes after the last reply", out.b.len());
}

fn reply(out: &mut Out, req: &Request, structured: bool) {
    let is_read = req.typ == NBD_CMD_READ;
    loop {
        let magic = out.u32("a reply");
        if magic == NBD_SIMPLE_REPLY_MAGIC {
            let error = out.u32("a simple reply");
            assert_eq!(out.u64("a simple reply"), req.handle, "reply out of order");
            assert!(!(structured && is_read), "simple reply to a READ after structured replies were agreed");
            if error == 0 && is_read {
                out.take(req.len as usize, "READ data");
            }
            if error != 0 {
                assert!(known_error(error), "error {error} is not an NBD error value");
            }
            return;
        }
        assert_eq!(magic, NBD_STRUCTURED_REPLY_MAGIC, "bad reply magic");
        assert!(structured, "structured reply that was not agreed");
        let flags = out.u16("a chunk");
        let typ = out.u16("a chunk");
        assert_eq!(out.u64("a chunk"), req.handle, "chunk out of order");
        let len = out.u32("a chunk");
        let data = out.take(len as usize, "chunk data");
        let mut d = Out { b: data };
        match typ {
            NBD_REPLY_TYPE_NONE => assert!(data.is_empty()),
            NBD_REPLY_TYPE_OFFSET_DATA => {
                assert!(is_read, "data for a non-READ");
                assert_eq!(d.u64("OFFSET_DATA"), req.offset);
                assert_eq!(d.b.len(), req.len as usize, "READ data of the wrong length");
            }
            NBD_REPLY_TYPE_BLOCK_STATUS => {
                assert_eq!(req.typ, NBD_CMD_BLOCK_STATUS);
                assert_eq!(d.u32("BLOCK_STATUS"), BASE_ALLOCATION_ID);
                assert!(!d.is_empty() && d.b.len() % 8 == 0, "BLOCK_STATUS needs descriptors");
                let n = d.b.len() / 8;
                assert!(n == 1 || req.flags & NBD_CMD_FLAG_REQ_ONE == 0, "REQ_ONE answered with {n}");
                let mut total = 0u64;
                while !d.is_empty() {
                    let l = d.u32("a descriptor");
                    let f = d.u32("a descriptor");
                    assert!(l > 0, "zero-length descriptor");
                    assert_eq!(f & !(NBD_STATE_HOLE | NBD_STATE_ZERO), 0);
                    total += u64::from(l);
                }
                assert!(total <= u64::from(req.len), "descriptors cover {total} of {} bytes", req.len);
            }
            NBD_REPLY_TYPE_ERROR => {
                let error = d.u32("an error chunk");
                assert!(error != 0 && known_error(error), "error {error}");
                let n = d.u16("an error chunk");
                assert_eq!(d.b.len(), n as usize, "error message length");
                assert!(std::str::from_utf8(d.b).is_ok(), "error message is not UTF-8");
            }
            other => panic!("unexpected chunk type {other}"),
        }
        if flags & NBD_REPLY_FLAG_DONE != 0 {
            return;
        }
    }
}

fn known_error(e: u32) -> bool {
    [NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN].contains(&e)
}

/// The handshake: client flags, options (with any lengths), and what follows.
pub fn nbd_handshake(data: &[u8]) {
    let out = converse(data);
    check(data, &out);
}

fn option(buf: &mut Vec<u8>, opt: u32, data: &[u8]) {
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
}

/// The transmission phase: the first byte picks a valid negotiation (structured
/// replies, `base:allocation`, NO_ZEROES), the rest is the request stream.
pub fn nbd_transmission(data: &[u8]) {
    let Some((&mode, requests)) = data.split_first() else { return };
    let mut input = Vec::with_capacity(128 + requests.len());
    let no_zeroes = mode & 4 != 0;
    let flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
    input.extend_from_slice(&flags.to_be_bytes());
    if mode & 1 != 0 {
        option(&mut input, NBD_OPT_STRUCTURED_REPLY, &[]);
        if mode & 2 != 0 {
            let mut q = Vec::new();
            q.extend_from_slice(&0u32.to_be_bytes());
            q.extend_from_slice(&1u32.to_be_bytes());
            q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            q.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option(&mut input, NBD_OPT_SET_META_CONTEXT, &q);
        }
    }
    if mode & 8 != 0 {
        option(&mut input, NBD_OPT_EXPORT_NAME, EXPORT.as_bytes());
    } else {
        let mut go = Vec::new();
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        option(&mut input, NBD_OPT_GO, &go);
    }
    input.extend_from_slice(requests);
    let out = converse(&input);
    check(&input, &out);
}
