//! The NBD server against a raw-socket client: malformed handshakes, odd and invalid
//! requests, pipelining, disconnects, engine errors, listener life cycle.

mod common;

use common::*;
use longhorn_frontend::nbd::proto::*;
use longhorn_frontend::NbdServer;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// A structured READ reply: one OFFSET_DATA chunk with DONE.
fn read_chunk(c: &mut Client, handle: u64, offset: u64) -> Vec<u8> {
    let ch = c.chunk();
    assert_eq!(ch.handle, handle);
    assert_eq!(ch.typ, NBD_REPLY_TYPE_OFFSET_DATA, "{ch:?}");
    assert_eq!(ch.flags, NBD_REPLY_FLAG_DONE);
    assert_eq!(
        u64::from_be_bytes(ch.payload[..8].try_into().unwrap()),
        offset
    );
    ch.payload[8..].to_vec()
}

/// Reads still work on a connection (it is in sync and usable).
fn assert_usable(c: &mut Client, structured: bool, handle: u64) {
    c.request(0, NBD_CMD_READ, handle, 0, 512, &[]);
    if structured {
        assert_eq!(read_chunk(c, handle, 0).len(), 512);
    } else {
        let (h, err, data) = c.simple(512);
        assert_eq!((h, err, data.len()), (handle, 0, 512));
    }
}

// ---- Handshake -----------------------------------------------------------------------

fn garbage_handshakes(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Sync);

    // A client that connects and then sits there must not hold anyone up.
    let (mut idle, flags) = Client::greet(&srv.addr);
    assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);

    // Unknown client flags: the spec says drop the connection.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&0xdead_beefu32.to_be_bytes());
    assert!(c.expect_closed().is_empty());
    expect_log(&["WARN", "client flags 0xdeadbeef contain unknown bits"]);

    // Something that does not speak NBD at all.
    let mut c = Client::connect(&srv.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n");
    let got = c.expect_closed();
    assert_eq!(&got[..8], b"NBDMAGIC", "only the greeting may come back");
    assert_eq!(got.len(), 18);

    // Valid flags, then an option with a bad magic.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(c.expect_closed().is_empty());
    expect_log(&["WARN", "bad option magic 0x49484156454f5058"]);

    // A client that hangs up in the middle of an option.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(&IHAVEOPT.to_be_bytes());
    c.send(&NBD_OPT_GO.to_be_bytes());
    c.send(&100u32.to_be_bytes());
    c.send(&[0u8; 10]);
    c.shutdown_write();
    assert!(c.expect_closed().is_empty());

    // Everyone else is still served: a real client, and the idle one.
    let out = run("nbdinfo", &["--size", &srv.uri]);
    assert!(
        out.ok(),
        "nbdinfo failed after garbage clients: {}",
        out.stderr
    );
    assert_eq!(out.stdout.trim(), (8 * MIB).to_string());
    idle.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
    idle.opt(NBD_OPT_GO, &go_data("", &[]));
    let mut r = idle.opt_reply();
    while r.typ == NBD_REP_INFO {
        r = idle.opt_reply();
    }
    assert_eq!(r.typ, NBD_REP_ACK);
    assert_usable(&mut idle, false, 1);
}

#[test]
fn garbage_handshakes_unix() {
    garbage_handshakes(Transport::Unix);
}

#[test]
fn garbage_handshakes_tcp() {
    garbage_handshakes(Transport::Tcp);
}

fn option_errors(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Sync);
    let name = srv.backend_name();
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());

    let expect = |c: &mut Client, opt: u32, data: &[u8], want: u32| -> String {
        c.opt(opt, data);
        let r = c.opt_reply();
        assert_eq!(r.opt, opt, "reply must echo the option");
        assert_eq!(
            r.typ,
            want,
            "option {opt}: got reply {:#x}, message {:?}",
            r.typ,
            String::from_utf8_lossy(&r.data)
        );
        String::from_utf8_lossy(&r.data).into_owned()
    };

    // Oversized option data is skipped, refused, and negotiation goes on.
    let msg = expect(
        &mut c,
        NBD_OPT_LIST,
        &vec![b'x'; 100_000],
        NBD_REP_ERR_INVALID,
    );
    assert!(msg.contains("100000"), "{msg}");
    expect(&mut c, NBD_OPT_STARTTLS, &[], NBD_REP_ERR_UNSUP);
    expect(&mut c, NBD_OPT_EXTENDED_HEADERS, &[], NBD_REP_ERR_UNSUP);
    expect(&mut c, 4242, b"whatever", NBD_REP_ERR_UNSUP);
    expect(&mut c, NBD_OPT_LIST, b"junk", NBD_REP_ERR_INVALID);
    expect(
        &mut c,
        NBD_OPT_STRUCTURED_REPLY,
        b"junk",
        NBD_REP_ERR_INVALID,
    );

    // LIST names the export.
    c.opt(NBD_OPT_LIST, &[]);
    let r = c.opt_reply();
    assert_eq!(r.typ, NBD_REP_SERVER);
    assert_eq!(be32(&r.data) as usize, name.len());
    assert_eq!(&r.data[4..], name.as_bytes());
    assert_eq!(c.opt_reply().typ, NBD_REP_ACK);

    // Unknown export and malformed GO data.
    let msg = expect(
        &mut c,
        NBD_OPT_GO,
        &go_data("nope", &[]),
        NBD_REP_ERR_UNKNOWN,
    );
    assert!(msg.contains("nope"), "{msg}");
    let mut bad = go_data("", &[]);
    bad[3] = 50; // name length past the end of the data
    expect(&mut c, NBD_OPT_GO, &bad, NBD_REP_ERR_INVALID);
    let mut trailing = go_data("", &[NBD_INFO_NAME]);
    trailing.push(0);
    expect(&mut c, NBD_OPT_INFO, &trailing, NBD_REP_ERR_INVALID);

    // INFO by name, asking for everything (and something unknown, which is ignored).
    c.opt(
        NBD_OPT_INFO,
        &go_data(
            &name,
            &[
                NBD_INFO_NAME,
                NBD_INFO_DESCRIPTION,
                NBD_INFO_BLOCK_SIZE,
                999,
            ],
        ),
    );
    let mut infos = HashMap::new();
    loop {
        let r = c.opt_reply();
        if r.typ == NBD_REP_ACK {
            break;
        }
        assert_eq!(r.typ, NBD_REP_INFO);
        infos.insert(
            u16::from_be_bytes([r.data[0], r.data[1]]),
            r.data[2..].to_vec(),
        );
    }
    let export = &infos[&NBD_INFO_EXPORT];
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 8 * MIB);
    assert_eq!(
        u16::from_be_bytes([export[8], export[9]]),
        TRANSMISSION_FLAGS
    );
    assert_eq!(infos[&NBD_INFO_NAME], name.as_bytes());
    assert!(String::from_utf8_lossy(&infos[&NBD_INFO_DESCRIPTION]).contains(&name));
    let bs = &infos[&NBD_INFO_BLOCK_SIZE];
    assert_eq!(
        (be32(bs), be32(&bs[4..]), be32(&bs[8..])),
        (1, 4096, 32 * MIB as u32)
    );
    assert!(!infos.contains_key(&999));

    // Metadata contexts need structured replies first.
    expect(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &meta_query("", &[BASE_ALLOCATION]),
        NBD_REP_ERR_INVALID,
    );
    expect(&mut c, NBD_OPT_STRUCTURED_REPLY, &[], NBD_REP_ACK);
    for queries in [&[][..], &["base:"][..], &[BASE_ALLOCATION][..]] {
        c.opt(NBD_OPT_LIST_META_CONTEXT, &meta_query("", queries));
        let r = c.opt_reply();
        assert_eq!(r.typ, NBD_REP_META_CONTEXT, "list {queries:?}");
        assert_eq!(&r.data[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(c.opt_reply().typ, NBD_REP_ACK);
    }
    expect(
        &mut c,
        NBD_OPT_LIST_META_CONTEXT,
        &meta_query("", &["x-other:thing"]),
        NBD_REP_ACK,
    );
    expect(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &meta_query("nope", &[BASE_ALLOCATION]),
        NBD_REP_ERR_UNKNOWN,
    );
    let mut huge_count = meta_query("", &[]);
    huge_count[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
    expect(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &huge_count,
        NBD_REP_ERR_INVALID,
    );
    // Selecting base:allocation, then replacing it with nothing.
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_query(&name, &[BASE_ALLOCATION]),
    );
    let r = c.opt_reply();
    assert_eq!(r.typ, NBD_REP_META_CONTEXT);
    assert_eq!(be32(&r.data), BASE_ALLOCATION_ID);
    assert_eq!(c.opt_reply().typ, NBD_REP_ACK);
    expect(
        &mut c,
        NBD_OPT_SET_META_CONTEXT,
        &meta_query("", &["x-other:thing"]),
        NBD_REP_ACK,
    );

    // Finally GO works, and BLOCK_STATUS is refused since no context is selected.
    c.opt(NBD_OPT_GO, &go_data("", &[]));
    let mut r = c.opt_reply();
    while r.typ == NBD_REP_INFO {
        r = c.opt_reply();
    }
    assert_eq!(r.typ, NBD_REP_ACK);
    c.request(0, NBD_CMD_BLOCK_STATUS, 9, 0, 4096, &[]);
    let (err, msg) = error_chunk(&c.chunk());
    assert_eq!(err, NBD_EINVAL);
    assert!(msg.contains("metadata context"), "{msg}");
    assert_usable(&mut c, true, 10);
}

#[test]
fn option_errors_unix() {
    option_errors(Transport::Unix);
}

#[test]
fn option_errors_tcp() {
    option_errors(Transport::Tcp);
}

#[test]
fn export_name_and_abort() {
    let srv = start(Transport::Unix, 8 * MIB, Mode::Sync);

    // Old-style entry without NO_ZEROES: size, flags, 124 zero bytes.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.opt(NBD_OPT_EXPORT_NAME, b"");
    assert_eq!(c.u64(), 8 * MIB);
    assert_eq!(c.u16(), TRANSMISSION_FLAGS);
    assert_eq!(c.bytes(124), vec![0u8; 124]);
    assert_usable(&mut c, false, 1);

    // With NO_ZEROES and the export's name; the next bytes are already a reply.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
    c.opt(NBD_OPT_EXPORT_NAME, srv.backend_name().as_bytes());
    assert_eq!(c.u64(), 8 * MIB);
    assert_eq!(c.u16(), TRANSMISSION_FLAGS);
    assert_usable(&mut c, false, 2);

    // Unknown name: the only possible answer is hanging up.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.opt(NBD_OPT_EXPORT_NAME, b"other-volume");
    assert!(c.expect_closed().is_empty());
    expect_log(&[
        "WARN",
        "NBD_OPT_EXPORT_NAME for unknown export 'other-volume'",
    ]);

    // ABORT is acknowledged, then the server closes.
    let (mut c, _) = Client::greet(&srv.addr);
    c.send(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.opt(NBD_OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().typ, NBD_REP_ACK);
    assert!(c.expect_closed().is_empty());
}

// ---- Transmission: broken clients ----------------------------------------------------

fn bad_request_magic(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Sync);
    let (mut other, _, _) = Client::open(&srv.addr, true, false);
    let (mut c, _, _) = Client::open(&srv.addr, false, false);
    // A valid request, then garbage: the valid one is still answered, then we hang up.
    let mut buf = Vec::new();
    Request {
        flags: 0,
        typ: NBD_CMD_READ,
        handle: 1,
        offset: 0,
        len: 16,
    }
    .encode(&mut buf);
    let mut bad = Vec::new();
    Request {
        flags: 0,
        typ: NBD_CMD_READ,
        handle: 2,
        offset: 0,
        len: 16,
    }
    .encode(&mut bad);
    bad[..4].copy_from_slice(&0xfeed_f00du32.to_be_bytes());
    buf.extend_from_slice(&bad);
    c.send(&buf);
    let (h, err, data) = c.simple(16);
    assert_eq!((h, err, data.len()), (1, 0, 16));
    assert!(
        c.expect_closed().is_empty(),
        "nothing may follow the valid reply"
    );
    expect_log(&["WARN", "bad request magic 0xfeedf00d"]);
    // The other connection is unaffected.
    assert_usable(&mut other, true, 3);
}

#[test]
fn bad_request_magic_unix() {
    bad_request_magic(Transport::Unix);
}

#[test]
fn bad_request_magic_tcp() {
    bad_request_magic(Transport::Tcp);
}

fn truncated_write(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Sync);
    let (mut c, _, _) = Client::open(&srv.addr, true, false);
    c.request(0, NBD_CMD_WRITE, 7, 4096, 65536, &[0xaa; 1000]);
    c.shutdown_write();
    assert!(
        c.expect_closed().is_empty(),
        "a dropped write must not be answered"
    );
    expect_log(&["WARN", "middle of a WRITE payload (1000 of 65536 bytes)"]);
    assert_eq!(
        srv.backend.submitted.load(Ordering::SeqCst),
        0,
        "nothing may be submitted"
    );
    assert!(srv.backend.contents().iter().all(|&b| b == 0));
    let out = run("nbdinfo", &["--size", &srv.uri]);
    assert!(out.ok(), "{}", out.stderr);
}

#[test]
fn truncated_write_unix() {
    truncated_write(Transport::Unix);
}

#[test]
fn truncated_write_tcp() {
    truncated_write(Transport::Tcp);
}

// ---- Transmission: invalid requests get errors, the connection lives on --------------

fn out_of_range(t: Transport, structured: bool) {
    let size = 8 * MIB;
    let srv = start(t, size, Mode::Sync);
    let (mut c, _, _) = Client::open(&srv.addr, structured, false);
    let check_err = |c: &mut Client, handle: u64, want: u32, what: &str| {
        if structured {
            let ch = c.chunk();
            assert_eq!(ch.handle, handle, "{what}");
            let (err, msg) = error_chunk(&ch);
            assert_eq!(err, want, "{what}: {msg}");
            assert!(!msg.is_empty(), "{what}: structured errors carry a message");
        } else {
            let (h, err, data) = c.simple(0);
            assert_eq!((h, err), (handle, want), "{what}");
            assert!(data.is_empty());
        }
    };

    c.request(0, NBD_CMD_READ, 1, size - 512, 1024, &[]);
    check_err(&mut c, 1, NBD_EINVAL, "read across the end");
    c.request(0, NBD_CMD_READ, 2, u64::MAX - 10, 100, &[]);
    check_err(&mut c, 2, NBD_EINVAL, "read with offset+len overflow");
    c.request(0, NBD_CMD_READ, 3, 0, 32 * MIB as u32 + 1, &[]);
    check_err(
        &mut c,
        3,
        NBD_EINVAL,
        "read larger than the maximum block size",
    );
    c.request(0, NBD_CMD_WRITE, 4, size - 100, 200, &[0x11; 200]);
    check_err(&mut c, 4, NBD_ENOSPC, "write across the end");
    c.request(0, NBD_CMD_WRITE_ZEROES, 5, size, 4096, &[]);
    check_err(&mut c, 5, NBD_ENOSPC, "write zeroes past the end");
    c.request(0, NBD_CMD_TRIM, 6, size + 4096, 4096, &[]);
    check_err(&mut c, 6, NBD_EINVAL, "trim past the end");
    c.request(0, 5, 7, 0, 4096, &[]); // NBD_CMD_CACHE: not advertised
    check_err(&mut c, 7, NBD_EINVAL, "CACHE");
    c.request(0, 200, 8, 0, 0, &[]);
    check_err(&mut c, 8, NBD_EINVAL, "unknown command");
    c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 9, 0, 512, &[]);
    check_err(&mut c, 9, NBD_EINVAL, "READ with DF (not advertised)");
    c.request(
        NBD_CMD_FLAG_REQ_ONE,
        NBD_CMD_WRITE,
        10,
        0,
        512,
        &[0x22; 512],
    );
    check_err(&mut c, 10, NBD_EINVAL, "WRITE with a flag it does not take");
    c.request(
        NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_WRITE_ZEROES,
        11,
        0,
        512,
        &[],
    );
    check_err(&mut c, 11, NBD_EINVAL, "FAST_ZERO (not advertised)");
    c.request(0, NBD_CMD_BLOCK_STATUS, 12, 0, 512, &[]);
    check_err(&mut c, 12, NBD_EINVAL, "BLOCK_STATUS without a context");
    assert_eq!(
        srv.backend.submitted.load(Ordering::SeqCst),
        0,
        "invalid requests reached the engine"
    );
    assert!(
        srv.backend.contents().iter().all(|&b| b == 0),
        "a rejected write was applied"
    );

    // Zero-length I/O at the very end is fine and needs no engine round trip.
    c.request(0, NBD_CMD_READ, 20, size, 0, &[]);
    if structured {
        let ch = c.chunk();
        assert_eq!(
            (ch.handle, ch.typ, ch.flags),
            (20, NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE)
        );
    } else {
        assert_eq!(c.simple(0), (20, 0, vec![]));
    }
    c.request(0, NBD_CMD_WRITE, 21, size, 0, &[]);
    assert_eq!(c.simple(0), (21, 0, vec![]));

    // Flags every command must accept: FUA on a read and a flush; NO_HOLE on zeroes.
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 22, 0, 0, &[]);
    assert_eq!(c.simple(0), (22, 0, vec![]));
    c.request(
        NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES,
        23,
        0,
        4096,
        &[],
    );
    assert_eq!(c.simple(0), (23, 0, vec![]));

    // A valid write and read on the same connection, right up to the end.
    let data = random_bytes(4096, 9);
    c.request(
        NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE,
        30,
        size - 4096,
        4096,
        &data,
    );
    assert_eq!(c.simple(0), (30, 0, vec![]));
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 31, size - 4096, 4096, &[]);
    let got = if structured {
        read_chunk(&mut c, 31, size - 4096)
    } else {
        c.simple(4096).2
    };
    assert!(got == data, "read back differs");

    // A write too large to skip safely: error reply, then the server hangs up.
    c.request(0, NBD_CMD_WRITE, 40, 0, 32 * MIB as u32 + 4096, &[0; 4096]);
    check_err(
        &mut c,
        40,
        NBD_EINVAL,
        "write larger than the maximum block size",
    );
    assert!(c.expect_closed().is_empty());
}

#[test]
fn out_of_range_simple_unix() {
    out_of_range(Transport::Unix, false);
}

#[test]
fn out_of_range_structured_unix() {
    out_of_range(Transport::Unix, true);
}

#[test]
fn out_of_range_simple_tcp() {
    out_of_range(Transport::Tcp, false);
}

#[test]
fn out_of_range_structured_tcp() {
    out_of_range(Transport::Tcp, true);
}

#[test]
fn block_status() {
    let srv = start(Transport::Unix, 8 * MIB, Mode::Async);
    let (mut c, _, _) = Client::open(&srv.addr, true, true);
    c.request(0, NBD_CMD_WRITE, 1, 8192, 4096, &[1; 4096]);
    assert_eq!(c.simple(0), (1, 0, vec![]));

    let status =
        |c: &mut Client, flags: u16, handle: u64, offset: u64, len: u32| -> Vec<(u32, u32)> {
            c.request(flags, NBD_CMD_BLOCK_STATUS, handle, offset, len, &[]);
            let ch = c.chunk();
            assert_eq!(ch.handle, handle);
            assert_eq!(
                (ch.typ, ch.flags),
                (NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_FLAG_DONE),
                "{ch:?}"
            );
            assert_eq!(be32(&ch.payload), BASE_ALLOCATION_ID);
            ch.payload[4..]
                .chunks(8)
                .map(|d| (be32(d), be32(&d[4..])))
                .collect()
        };
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;
    assert_eq!(
        status(&mut c, 0, 2, 0, 65536),
        vec![(8192, hz), (4096, 0), (53248, hz)]
    );
    assert_eq!(
        status(&mut c, NBD_CMD_FLAG_REQ_ONE, 3, 0, 65536),
        vec![(8192, hz)]
    );
    assert_eq!(status(&mut c, 0, 4, 10000, 100), vec![(100, 0)]);
    assert_eq!(status(&mut c, 0, 5, 8 * MIB - 512, 512), vec![(512, hz)]);

    c.request(0, NBD_CMD_BLOCK_STATUS, 6, 8 * MIB - 512, 1024, &[]);
    assert_eq!(error_chunk(&c.chunk()).0, NBD_EINVAL);
    c.request(0, NBD_CMD_BLOCK_STATUS, 7, 0, 0, &[]);
    assert_eq!(error_chunk(&c.chunk()).0, NBD_EINVAL);
}

// ---- Pipelining, out-of-order completion, disconnect ---------------------------------

fn pipelined(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Async);
    let (mut c, _, _) = Client::open(&srv.addr, true, false);
    let n = 200u64;
    // One burst of writes to distinct blocks, with different sizes.
    let mut buf = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..n {
        let len = 512 * (1 + (i % 16)) as u32;
        let data = random_bytes(len as usize, i + 1);
        Request {
            flags: 0,
            typ: NBD_CMD_WRITE,
            handle: 1000 + i,
            offset: i * 16384,
            len,
        }
        .encode(&mut buf);
        buf.extend_from_slice(&data);
        expected.insert(i, data);
    }
    c.send(&buf);
    let mut order = Vec::new();
    for _ in 0..n {
        let (h, err, _) = c.simple(0);
        assert_eq!(err, 0);
        order.push(h);
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (1000..1000 + n).collect::<Vec<_>>(),
        "every write answered exactly once"
    );
    assert_ne!(order, sorted, "completions were expected out of order");

    // One burst of reads; replies matched by handle.
    let mut buf = Vec::new();
    for i in 0..n {
        let len = expected[&i].len() as u32;
        Request {
            flags: 0,
            typ: NBD_CMD_READ,
            handle: 5000 + i,
            offset: i * 16384,
            len,
        }
        .encode(&mut buf);
    }
    c.send(&buf);
    for _ in 0..n {
        let ch = c.chunk();
        let i = ch.handle - 5000;
        assert!(i < n, "unexpected handle {}", ch.handle);
        assert_eq!(ch.typ, NBD_REPLY_TYPE_OFFSET_DATA);
        assert_eq!(
            u64::from_be_bytes(ch.payload[..8].try_into().unwrap()),
            i * 16384
        );
        assert!(
            ch.payload[8..] == expected[&i][..],
            "data for handle {} differs",
            ch.handle
        );
    }
}

#[test]
fn pipelined_unix() {
    pipelined(Transport::Unix);
}

#[test]
fn pipelined_tcp() {
    pipelined(Transport::Tcp);
}

fn disc_waits_for_in_flight(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Async);
    srv.backend.async_delay_ms.store(300, Ordering::SeqCst);
    let (mut c, _, _) = Client::open(&srv.addr, false, false);
    let mut buf = Vec::new();
    for i in 0..10u64 {
        Request {
            flags: 0,
            typ: NBD_CMD_WRITE,
            handle: i,
            offset: i * 4096,
            len: 4096,
        }
        .encode(&mut buf);
        buf.extend_from_slice(&[i as u8 + 1; 4096]);
        Request {
            flags: 0,
            typ: NBD_CMD_READ,
            handle: 100 + i,
            offset: MIB + i * 4096,
            len: 4096,
        }
        .encode(&mut buf);
    }
    Request {
        flags: 0,
        typ: NBD_CMD_DISC,
        handle: 999,
        offset: 0,
        len: 0,
    }
    .encode(&mut buf);
    c.send(&buf);
    let mut seen = Vec::new();
    for _ in 0..20 {
        let (h, err, _) = c.simple(0);
        assert_eq!(err, 0);
        if h >= 100 {
            c.bytes(4096);
        }
        seen.push(h);
    }
    seen.sort();
    let want: Vec<u64> = (0..10).chain(100..110).collect();
    assert_eq!(seen, want);
    assert!(
        c.expect_closed().is_empty(),
        "nothing after the last reply, and no reply to DISC"
    );
    let mem = srv.backend.contents();
    for i in 0..10usize {
        assert!(mem[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    let peer = c.peer_in_logs().unwrap_or_default();
    expect_log(&[
        "INFO",
        "NBD client disconnected: client sent NBD_CMD_DISC",
        "requests=21",
        &peer,
    ]);
    assert_eq!(srv.backend.unpushed_at_drop.load(Ordering::SeqCst), 0);
}

#[test]
fn disc_waits_for_in_flight_unix() {
    disc_waits_for_in_flight(Transport::Unix);
}

#[test]
fn disc_waits_for_in_flight_tcp() {
    disc_waits_for_in_flight(Transport::Tcp);
}

/// A client that stops reading its replies must not stall the engine's completion
/// thread (shared by all sessions here) nor other clients; its own replies are all
/// delivered once it reads again.
fn stuck_client(t: Transport) {
    let srv = start(t, 64 * MIB, Mode::Async);
    let (mut stuck, _, _) = Client::open(&srv.addr, true, false);
    let n = 160u64;
    let mut buf = Vec::new();
    for i in 0..n {
        Request {
            flags: 0,
            typ: NBD_CMD_READ,
            handle: i,
            offset: (i % 64) * MIB,
            len: MIB as u32,
        }
        .encode(&mut buf);
    }
    stuck.send(&buf);
    // The server stops admitting its requests at the per-connection memory limit.
    wait_until("the stuck client's requests to be admitted", || {
        srv.backend.submitted.load(Ordering::SeqCst) >= 40
    });
    std::thread::sleep(Duration::from_millis(200));
    let admitted = srv.backend.submitted.load(Ordering::SeqCst);
    assert!(
        admitted < n,
        "no backpressure: all {admitted} requests admitted"
    );

    // Meanwhile another client gets full service from the same completion thread.
    let out = run_timeout(
        "qemu-io",
        &[
            "-f",
            "raw",
            &srv.uri,
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
        ],
        Duration::from_secs(20),
    );
    assert!(
        out.ok() && !out.stdout.contains("failed"),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // The stuck client reads again and gets every reply.
    let mut handles: Vec<u64> = (0..n).map(|_| stuck.chunk().handle).collect();
    handles.sort();
    assert_eq!(handles, (0..n).collect::<Vec<_>>());
    assert_usable(&mut stuck, true, 9999);
}

#[test]
fn stuck_client_unix() {
    stuck_client(Transport::Unix);
}

#[test]
fn stuck_client_tcp() {
    stuck_client(Transport::Tcp);
}

#[test]
fn client_vanishes_with_requests_in_flight() {
    let srv = start(Transport::Tcp, 64 * MIB, Mode::Async);
    srv.backend.async_delay_ms.store(50, Ordering::SeqCst);
    for _ in 0..3 {
        let (mut c, _, _) = Client::open(&srv.addr, true, false);
        let mut buf = Vec::new();
        for i in 0..64u64 {
            Request {
                flags: 0,
                typ: NBD_CMD_READ,
                handle: i,
                offset: i * MIB,
                len: MIB as u32,
            }
            .encode(&mut buf);
        }
        c.send(&buf);
        drop(c);
    }
    let out = run("nbdinfo", &["--size", &srv.uri]);
    assert!(out.ok(), "{}", out.stderr);
    let (mut c, _, _) = Client::open(&srv.addr, true, false);
    assert_usable(&mut c, true, 1);
}

// ---- Engine errors -------------------------------------------------------------------

fn engine_errors(t: Transport) {
    let srv = start(t, 8 * MIB, Mode::Async);
    {
        let mut f = srv.backend.fail_at.lock().unwrap();
        f.insert(4096, libc::EDQUOT);
        f.insert(8192, libc::ETIMEDOUT);
        f.insert(12288, libc::EIO);
        f.insert(16384, libc::ESHUTDOWN);
        f.insert(20480, libc::EPERM);
    }
    let (mut s, _, _) = Client::open(&srv.addr, true, false);
    for (off, want, text) in [
        (4096, NBD_ENOSPC, "quota"),
        (8192, NBD_EIO, "timed out"),
        (12288, NBD_EIO, "Input/output error"),
        (16384, NBD_ESHUTDOWN, "shutdown"),
    ] {
        s.request(0, NBD_CMD_READ, off, off, 4096, &[]);
        let ch = s.chunk();
        assert_eq!(ch.handle, off);
        let (err, msg) = error_chunk(&ch);
        assert_eq!(err, want, "errno at {off}: {msg}");
        assert!(
            msg.to_lowercase().contains(&text.to_lowercase()),
            "message {msg:?} should mention {text:?}"
        );
    }
    s.request(0, NBD_CMD_WRITE, 1, 20480, 512, &[5; 512]);
    assert_eq!(error_chunk(&s.chunk()).0, NBD_EPERM);
    assert_usable(&mut s, true, 2);

    // Simple replies: an error header with no data, and the stream stays in sync.
    let (mut c, _, _) = Client::open(&srv.addr, false, false);
    c.request(0, NBD_CMD_READ, 3, 12288, 4096, &[]);
    assert_eq!(c.simple(4096), (3, NBD_EIO, vec![]));
    c.request(0, NBD_CMD_TRIM, 4, 4096, 4096, &[]);
    assert_eq!(c.simple(0), (4, NBD_ENOSPC, vec![]));
    assert_usable(&mut c, false, 5);
}

#[test]
fn engine_errors_unix() {
    engine_errors(Transport::Unix);
}

#[test]
fn engine_errors_tcp() {
    engine_errors(Transport::Tcp);
}

// ---- Listener life cycle -------------------------------------------------------------

#[test]
fn unix_listener_lifecycle() {
    init_logs();
    let dir = TestDir::new("life");
    let path = dir.path("vol.sock");
    let backend = MemBackend::new("life", MIB, Mode::Sync);
    let listen = format!("unix:{}", path.display());

    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(socket_exists(&path));
    let server = NbdServer::bind(&listen, backend.clone()).expect("bind over a stale socket");
    assert_eq!(
        server.uri(),
        format!("nbd+unix:///?socket={}", path.display())
    );
    let handle = server.spawn().unwrap();
    assert_eq!(
        handle.uri(),
        format!("nbd+unix:///?socket={}", path.display())
    );

    // A live one is not.
    let err = NbdServer::bind(&listen, backend.clone()).expect_err("bind over a live socket");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");

    // A regular file is never removed.
    let file = dir.path("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = NbdServer::bind(&format!("unix:{}", file.display()), backend.clone())
        .expect_err("bind over a file");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // Shutdown stops accepting and removes the socket; open connections keep working.
    let addr = Addr::Unix(path.clone());
    let (mut c, _, _) = Client::open(&addr, false, false);
    handle.shutdown();
    assert!(!socket_exists(&path), "socket file not removed");
    assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
    assert_usable(&mut c, false, 1);

    // Dropping the handle works the same way.
    let handle = NbdServer::bind(&listen, backend.clone())
        .unwrap()
        .spawn()
        .unwrap();
    assert!(socket_exists(&path));
    drop(handle);
    assert!(!socket_exists(&path));

    // Paths that need escaping in the URI still work with real clients.
    let odd = dir.path("a b&c.sock");
    let handle = NbdServer::bind(&format!("unix:{}", odd.display()), backend)
        .unwrap()
        .spawn()
        .unwrap();
    assert!(handle.uri().contains("a%20b%26c.sock"), "{}", handle.uri());
    let out = run("nbdinfo", &["--size", &handle.uri()]);
    assert!(out.ok(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), MIB.to_string());
}

#[test]
fn tcp_listener_lifecycle() {
    init_logs();
    let backend: Arc<MemBackend> = MemBackend::new("tcplife", MIB, Mode::Sync);
    let server = NbdServer::bind("tcp:127.0.0.1:0", backend.clone()).unwrap();
    let uri = server.uri();
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with('/'),
        "{uri}"
    );
    let port: u16 = uri["nbd://127.0.0.1:".len()..uri.len() - 1]
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    let handle = server.spawn().unwrap();
    let addr = Addr::Tcp(format!("127.0.0.1:{port}").parse().unwrap());
    let (mut c, _, _) = Client::open(&addr, true, false);
    handle.shutdown();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting"
    );
    assert_usable(&mut c, true, 1);

    // A wildcard bind advertises loopback.
    let h = NbdServer::bind("tcp:0.0.0.0:0", backend.clone()).unwrap();
    assert!(h.uri().starts_with("nbd://127.0.0.1:"), "{}", h.uri());

    for bad in [
        "",
        "nbd:foo",
        "tcp:no-port",
        "tcp:127.0.0.1:notaport",
        "unix:",
    ] {
        let err = NbdServer::bind(bad, backend.clone()).expect_err(bad);
        assert!(!err.to_string().is_empty());
    }
}
