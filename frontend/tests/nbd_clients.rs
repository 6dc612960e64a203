//! The NBD server against real clients: nbdinfo, nbdcopy, qemu-img, qemu-io.

mod common;

use common::*;
use std::sync::atomic::Ordering;

const MIB: u64 = 1024 * 1024;

fn nbdinfo_size_and_flags(t: Transport) {
    let srv = start(t, 64 * MIB, Mode::Sync);
    let out = run("nbdinfo", &["--size", &srv.uri]);
    assert!(out.ok(), "nbdinfo --size failed: {}", out.stderr);
    assert_eq!(out.stdout.trim(), (64 * MIB).to_string());

    for cap in [
        "flush",
        "multi-conn",
        "trim",
        "zero",
        "fua",
        "structured-reply",
    ] {
        let out = run("nbdinfo", &["--can", cap, &srv.uri]);
        assert_eq!(
            out.status,
            Some(0),
            "nbdinfo --can {cap}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    // Things we must not claim.
    let out = run("nbdinfo", &["--is", "read-only", &srv.uri]);
    assert_eq!(
        out.status,
        Some(2),
        "export must not be read-only: {}",
        out.stderr
    );
    let out = run("nbdinfo", &["--can", "cache", &srv.uri]);
    assert_eq!(
        out.status,
        Some(2),
        "must not advertise CACHE: {}",
        out.stderr
    );

    // The full report: export list, block sizes, contexts.
    let out = run("nbdinfo", &["--json", &srv.uri]);
    assert!(out.ok(), "nbdinfo --json failed: {}", out.stderr);
    for want in [
        "\"export-size\": 67108864",
        "\"block_size_minimum\": 1",
        "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432",
        "\"base:allocation\"",
    ] {
        assert!(
            out.stdout.contains(want),
            "missing {want} in:\n{}",
            out.stdout
        );
    }
    let out = run("nbdinfo", &["--list", &srv.uri]);
    assert!(out.ok(), "nbdinfo --list failed: {}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("export=\"{}\"", srv.backend_name())),
        "{}",
        out.stdout
    );
}

#[test]
fn nbdinfo_size_and_flags_unix() {
    nbdinfo_size_and_flags(Transport::Unix);
}

#[test]
fn nbdinfo_size_and_flags_tcp() {
    nbdinfo_size_and_flags(Transport::Tcp);
}

fn nbdinfo_map(t: Transport) {
    let srv = start(t, 16 * MIB, Mode::Sync);
    // Nothing written yet: one hole.
    let out = run("nbdinfo", &["--map", &srv.uri]);
    assert!(out.ok(), "nbdinfo --map failed: {}", out.stderr);
    let lines: Vec<Vec<String>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    assert_eq!(
        lines,
        vec![vec!["0", "16777216", "3", "hole,zero"]],
        "{}",
        out.stdout
    );

    // Write 64 KiB at 1 MiB through NBD (qemu-io), then map again.
    let out = run(
        "qemu-io",
        &["-f", "raw", &srv.uri, "-c", "write -P 0xab 1M 64k"],
    );
    assert!(
        out.ok(),
        "qemu-io write failed: {}{}",
        out.stdout,
        out.stderr
    );
    let out = run("nbdinfo", &["--map", &srv.uri]);
    assert!(out.ok(), "nbdinfo --map failed: {}", out.stderr);
    let lines: Vec<Vec<String>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    let want: Vec<Vec<String>> = [
        ["0", "1048576", "3", "hole,zero"],
        ["1048576", "65536", "0", "data"],
        ["1114112", "15663104", "3", "hole,zero"],
    ]
    .iter()
    .map(|r| r.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(lines, want, "{}", out.stdout);

    // --totals adds up the same way.
    let out = run("nbdinfo", &["--map", "--totals", &srv.uri]);
    assert!(out.ok(), "{}", out.stderr);
    assert!(out.stdout.contains("65536"), "{}", out.stdout);
}

#[test]
fn nbdinfo_map_unix() {
    nbdinfo_map(Transport::Unix);
}

#[test]
fn nbdinfo_map_tcp() {
    nbdinfo_map(Transport::Tcp);
}

fn nbdcopy_roundtrip(t: Transport, mode: Mode) {
    let size = 8 * MIB;
    let srv = start(t, size, mode);
    let dir = TestDir::new("copy");
    let src = dir.path("src.img");
    let back = dir.path("back.img");
    let data = random_bytes(size as usize, 0x5eed ^ size);
    std::fs::write(&src, &data).unwrap();

    // In: several connections (CAN_MULTI_CONN) and many requests in flight.
    let out = run("nbdcopy", &["--flush", src.to_str().unwrap(), &srv.uri]);
    assert!(
        out.ok(),
        "nbdcopy into NBD failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        srv.backend.contents() == data,
        "volume content differs from the source file"
    );
    assert!(
        srv.backend.flushes.load(Ordering::SeqCst) > 0,
        "nbdcopy --flush sent no FLUSH"
    );

    // Out again, and compare what a user would compare: the files.
    let out = run("nbdcopy", &[&srv.uri, back.to_str().unwrap()]);
    assert!(
        out.ok(),
        "nbdcopy out of NBD failed: {}{}",
        out.stdout,
        out.stderr
    );
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "data read back over NBD differs");

    // Small requests, one connection, 64 in flight.
    std::fs::remove_file(&back).unwrap();
    let out = run(
        "nbdcopy",
        &[
            "-C",
            "1",
            "--request-size=4096",
            "-R",
            "64",
            &srv.uri,
            back.to_str().unwrap(),
        ],
    );
    assert!(
        out.ok(),
        "nbdcopy with 4 KiB requests failed: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "data read back with 4 KiB requests differs"
    );
}

#[test]
fn nbdcopy_roundtrip_unix_sync() {
    nbdcopy_roundtrip(Transport::Unix, Mode::Sync);
}

#[test]
fn nbdcopy_roundtrip_tcp_async_out_of_order() {
    nbdcopy_roundtrip(Transport::Tcp, Mode::Async);
}

#[test]
fn nbdcopy_roundtrip_unix_async_out_of_order() {
    nbdcopy_roundtrip(Transport::Unix, Mode::Async);
}

fn qemu_img_compare(t: Transport) {
    let size = 4 * MIB;
    let srv = start(t, size, Mode::Sync);
    let dir = TestDir::new("cmp");
    let img = dir.path("img.raw");
    let data = random_bytes(size as usize, 77);
    std::fs::write(&img, &data).unwrap();
    let out = run("nbdcopy", &[img.to_str().unwrap(), &srv.uri]);
    assert!(out.ok(), "nbdcopy failed: {}", out.stderr);

    let cmp = || {
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                img.to_str().unwrap(),
                &srv.uri,
            ],
        )
    };
    let out = cmp();
    assert_eq!(
        out.status,
        Some(0),
        "qemu-img compare: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("Images are identical"),
        "{}",
        out.stdout
    );

    // A single differing byte must be noticed (so this test can fail).
    srv.backend
        .poke(3 * MIB as usize + 5, data[3 * MIB as usize + 5] ^ 0xff);
    let out = cmp();
    assert_eq!(
        out.status,
        Some(1),
        "qemu-img compare missed a difference: {}{}",
        out.stdout,
        out.stderr
    );
    // qemu-img reports the start of the sector that differs.
    let at: u64 = out
        .stdout
        .trim()
        .strip_prefix("Content mismatch at offset ")
        .and_then(|s| s.trim_end_matches('!').parse().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img output: {}", out.stdout));
    assert!(
        (3 * MIB..=3 * MIB + 5).contains(&at),
        "mismatch reported at {at}"
    );
}

#[test]
fn qemu_img_compare_unix() {
    qemu_img_compare(Transport::Unix);
}

#[test]
fn qemu_img_compare_tcp() {
    qemu_img_compare(Transport::Tcp);
}

fn qemu_io_odd_requests(t: Transport) {
    let srv = start(t, 4 * MIB, Mode::Async);
    let qio = |cmds: &[&str]| {
        let mut args = vec!["-f", "raw", srv.uri.as_str()];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        let out = run("qemu-io", &args);
        assert!(
            out.ok(),
            "qemu-io {cmds:?} failed: {}{}",
            out.stdout,
            out.stderr
        );
        assert!(
            !out.stdout.contains("failed"),
            "qemu-io {cmds:?}: {}",
            out.stdout
        );
        out
    };
    // Unaligned write and read-back with pattern verification.
    qio(&[
        "write -P 0x5a 1000 3000",
        "read -P 0x5a 1000 3000",
        "read -P 0 0 1000",
        "read -P 0 4000 96",
    ]);
    // FUA write.
    let fua_before = srv.backend.fua.load(Ordering::SeqCst);
    qio(&["write -f -P 0x33 8192 4096", "read -P 0x33 8192 4096"]);
    assert!(
        srv.backend.fua.load(Ordering::SeqCst) > fua_before,
        "FUA flag did not reach the engine"
    );
    // Write zeroes (plain and with NO_HOLE semantics via -u), discard, flush.
    qio(&["write -z 8192 4096", "read -P 0 8192 4096"]);
    qio(&[
        "write -P 0x44 65536 65536",
        "write -z -u 65536 65536",
        "read -P 0 65536 65536",
    ]);
    qio(&["write -P 0x77 131072 65536", "discard 131072 65536"]);
    let flushes = srv.backend.flushes.load(Ordering::SeqCst);
    qio(&["flush"]);
    assert!(
        srv.backend.flushes.load(Ordering::SeqCst) > flushes,
        "flush did not reach the engine"
    );
    // A pipelined burst of small writes (aio) then read them back.
    qio(&[
        "aio_write -P 0x01 0 512",
        "aio_write -P 0x02 512 512",
        "aio_write -P 0x03 1024 512",
        "aio_flush",
        "read -P 0x01 0 512",
        "read -P 0x02 512 512",
        "read -P 0x03 1024 512",
    ]);
    // The whole last MiB up to the very end of the export.
    qio(&["write -P 0x99 3M 1M", "read -P 0x99 3M 1M"]);
    // Pattern verification must be able to fail.
    let out = run(
        "qemu-io",
        &["-f", "raw", &srv.uri, "-c", "read -P 0x98 3M 4096"],
    );
    assert!(
        out.stdout.contains("Pattern verification failed"),
        "{}",
        out.stdout
    );
}

#[test]
fn qemu_io_odd_requests_unix() {
    qemu_io_odd_requests(Transport::Unix);
}

#[test]
fn qemu_io_odd_requests_tcp() {
    qemu_io_odd_requests(Transport::Tcp);
}
