//! Writes the seed inputs of every target into `fuzz/corpus/TARGET/seed-*`: valid
//! messages made with the product's own encoders (and Longhorn's file examples), from
//! which a campaign mutates. `cargo run -p longhorn-fuzz-checks --example seeds`.

use longhorn_engine::backup::store::{Compression, BLOCK_SIZE};
use longhorn_frontend::nbd::proto::*;
use longhorn_replica::proto::{put_frame, Header, Op, FLAG_REPLY};
use std::path::Path;

fn opt(buf: &mut Vec<u8>, opt: u32, data: &[u8]) {
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
}

fn string(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s);
}

fn req(buf: &mut Vec<u8>, typ: u16, flags: u16, handle: u64, offset: u64, len: u32) {
    Request { flags, typ, handle, offset, len }.encode(buf);
}

/// A few requests of every kind, a WRITE with its payload, then DISC.
fn requests() -> Vec<u8> {
    let mut b = Vec::new();
    req(&mut b, NBD_CMD_READ, 0, 1, 0, 4096);
    req(&mut b, NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 2, 4096, 16);
    b.extend_from_slice(&[0x5a; 16]);
    req(&mut b, NBD_CMD_FLUSH, 0, 3, 0, 0);
    req(&mut b, NBD_CMD_TRIM, 0, 4, 8192, 4096);
    req(&mut b, NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 5, 0, 8192);
    req(&mut b, NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 6, 0, 65536);
    req(&mut b, NBD_CMD_READ, 0, 7, 3, 0);
    req(&mut b, NBD_CMD_CACHE, 0, 8, 0, 512);
    req(&mut b, NBD_CMD_READ, 0, 9, 65536 - 512, 1024);
    req(&mut b, NBD_CMD_DISC, 0, 10, 0, 0);
    b
}

fn handshakes() -> Vec<Vec<u8>> {
    let flags = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes();
    let mut out = Vec::new();

    // Structured replies, both meta context options, INFO, then GO and requests.
    let mut b = flags.to_vec();
    opt(&mut b, NBD_OPT_STRUCTURED_REPLY, &[]);
    let mut q = Vec::new();
    string(&mut q, b"fuzz");
    q.extend_from_slice(&1u32.to_be_bytes());
    string(&mut q, b"base:");
    opt(&mut b, NBD_OPT_LIST_META_CONTEXT, &q);
    let mut q = Vec::new();
    string(&mut q, b"");
    q.extend_from_slice(&1u32.to_be_bytes());
    string(&mut q, BASE_ALLOCATION.as_bytes());
    opt(&mut b, NBD_OPT_SET_META_CONTEXT, &q);
    let mut info = Vec::new();
    string(&mut info, b"fuzz");
    info.extend_from_slice(&3u16.to_be_bytes());
    for i in [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE] {
        info.extend_from_slice(&i.to_be_bytes());
    }
    opt(&mut b, NBD_OPT_INFO, &info);
    opt(&mut b, NBD_OPT_GO, &info);
    b.extend_from_slice(&requests());
    out.push(b);

    // Old-style EXPORT_NAME with the 124 zero bytes, then requests.
    let mut b = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    opt(&mut b, NBD_OPT_LIST, &[]);
    opt(&mut b, NBD_OPT_EXPORT_NAME, b"fuzz");
    b.extend_from_slice(&requests());
    out.push(b);

    // What gets refused: unsupported options, bad data, unknown export, then ABORT.
    let mut b = flags.to_vec();
    opt(&mut b, NBD_OPT_STARTTLS, &[]);
    opt(&mut b, NBD_OPT_EXTENDED_HEADERS, &[]);
    opt(&mut b, 4242, b"x");
    opt(&mut b, NBD_OPT_LIST, b"junk");
    opt(&mut b, NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    let mut g = Vec::new();
    string(&mut g, b"other");
    g.extend_from_slice(&0u16.to_be_bytes());
    opt(&mut b, NBD_OPT_GO, &g);
    opt(&mut b, NBD_OPT_GO, &[0, 0, 0, 9]);
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&NBD_OPT_INFO.to_be_bytes());
    b.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    opt(&mut b, NBD_OPT_ABORT, &[]);
    out.push(b);
    out
}

fn frames() -> Vec<Vec<u8>> {
    let hello = br#"{"volume":"vol1","size":1073741824}"#;
    let mut a = Vec::new();
    put_frame(&mut a, Header::request(Op::Hello, 0, 0, 0), hello);
    let mut w = Header::request(Op::Write, 7, 4096, 8);
    w.flags = 1;
    put_frame(&mut a, w, b"datadata");
    put_frame(&mut a, Header::request(Op::Read, 8, 0, 4096), &[]);
    put_frame(&mut a, Header::request(Op::Snapshot, 9, 0, 0), br#"{"name":"s1","user_created":true,"labels":{"k":"v"}}"#);
    let mut b = Vec::new();
    let mut r = Header::request(Op::Hello, 0, 0, 0);
    r.flags = FLAG_REPLY;
    put_frame(&mut b, r, INFO.as_bytes());
    let mut bs = Header::request(Op::BlockStatus, 3, 0, 8192);
    bs.flags = FLAG_REPLY;
    put_frame(&mut b, bs, &longhorn_replica::proto::encode_extents(&[(4096, false), (4096, true)]));
    let mut e = Header::request(Op::Read, 4, 0, 4096);
    e.flags = FLAG_REPLY;
    e.status = 5;
    put_frame(&mut b, e, b"input/output error");
    // Shared memory: the attach, a write and a read through the pool, and a reply.
    let mut c = Vec::new();
    put_frame(&mut c, Header::request(Op::ShareMemory, 0, 0, 0), br#"{"pid":1234,"fd":7,"len":33554432,"nonce":"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"}"#);
    let d = |offset: u64, crc: u32| longhorn_replica::shm::Descriptor { offset, crc }.encode();
    put_frame(&mut c, Header::request(Op::WriteShared, 10, 1 << 20, 65536), &d(65536, 0x1234_5678));
    put_frame(&mut c, Header::request(Op::ReadShared, 11, 0, 131072), &d(0, 0));
    let mut rs = Header::request(Op::ReadShared, 11, 0, 131072);
    rs.flags = FLAG_REPLY;
    put_frame(&mut c, rs, &d(0, 0x0bad_cafe));
    vec![a, b, c]
}

const INFO: &str = r#"{"volume":"vol1","size":1073741824,"sector_size":512,"revision":12,"was_dirty":false,"head":"volume-head-002.img","parent":"volume-snap-s1.img","chain":["volume-snap-s1.img","volume-head-002.img"],"mode":"RW","rebuilding":false,"progress":{"active":false,"bytes_total":10,"bytes_done":5,"bytes_sent":1,"elapsed_ms":3,"error":""},"head_has_data":true}"#;

const JOBS: &str = r#"[{"name":"snap","task":"snapshot","cron":"*/5 * * * *","retain":3},{"name":"bak-1","task":"backup-force-create","cron":"0 2 * * 1-5","retain":250,"labels":{"k":"v"},"groups":[],"concurrency":1}]"#;

fn blocks() -> Vec<Vec<u8>> {
    let zero = vec![0u8; BLOCK_SIZE as usize];
    let mut out = Vec::new();
    for (i, c) in [Compression::Lz4, Compression::Gzip].into_iter().enumerate() {
        let mut b = vec![i as u8, 0];
        b.extend_from_slice(&c.compress(&zero).expect("compress"));
        out.push(b);
    }
    // A named block whose name is not its content's checksum, and a small payload.
    let mut b = vec![0u8, 1];
    b.extend_from_slice(b"731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b1");
    b.extend_from_slice(&Compression::Lz4.compress(b"hello").expect("compress"));
    out.push(b);
    out
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let t = |s: &str| s.as_bytes().to_vec();
    let mut transmission = Vec::new();
    for mode in [0u8, 1, 3, 7, 8, 12] {
        let mut b = vec![mode];
        b.extend_from_slice(&requests());
        transmission.push(b);
    }
    let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("nbd_handshake", handshakes()),
        ("nbd_transmission", transmission),
        ("replica_frame", frames()),
        (
            "replica_hello",
            vec![t(r#"{"volume":"vol1","size":1073741824}"#), t(INFO), t(r#"{"name":"s1","user_created":true,"created":"2024-01-01T00:00:00Z","labels":{"a":"b"},"prepare":true}"#)],
        ),
        (
            "control_request",
            vec![
                t("{\"cmd\":\"volume-info\"}\n"),
                t(&format!("{{\"cmd\":\"job-add\",\"jobs\":{JOBS}}}\n")),
                t("{\"cmd\":\"job-clock\",\"advance\":300}\n"),
                t("{\"cmd\":\"snapshot-create\",\"name\":\"s1\",\"labels\":{\"k\":\"v\"}}\n"),
                t("{\"cmd\":\"backup-create\",\"target\":\"s3://bucket@us-east-1/prefix\",\"env\":{\"AWS_ENDPOINTS\":\"http://127.0.0.1:9000\"},\"snapshot\":null,\"labels\":{},\"compression\":\"gzip\"}\n"),
                t("{\"cmd\":\"backup-create\",\"target\":\"nfs://server:/export/path?nfsOptions=port=2049,vers=4.1\"}\n"),
                t("{\"cmd\":\"replica-rm\",\"address\":\"127.0.0.1:9502\"}\n"),
            ],
        ),
        (
            "volume_meta",
            vec![t(r#"{"Size":10737418240,"Head":"volume-head-002.img","Dirty":true,"Rebuilding":false,"Error":"","Parent":"volume-snap-s1.img","SectorSize":512,"BackingFilePath":"","Encrypted":false,"VolumeName":"vol1"}"#)],
        ),
        (
            "disk_meta",
            vec![t(r#"{"Name":"volume-snap-s1.img","Parent":"volume-snap-5d40.img","Removed":false,"UserCreated":true,"Created":"2022-02-22T07:36:48Z","Labels":{"RecurringJob":"snap"}}"#)],
        ),
        ("revision_counter", vec![t("1234\0\0\0\0"), t("18446744073709551615")]),
        (
            "backup_volume_cfg",
            vec![t(r#"{"Name":"pvc-1","Size":"2147483648","Labels":null,"CreatedTime":"2024-01-01T00:00:00Z","LastBackupName":"backup-a","LastBackupAt":"2024-01-01T00:00:00Z","BlockCount":"10","BackingImageName":"\"\"","BackingImageChecksum":"\"\"","CompressionMethod":"\"gzip\"","StorageClassName":"\"longhorn\"","DataEngine":"\"v1\""}"#)],
        ),
        (
            "backup_cfg",
            vec![t(r#"{"Name":"backup-0123456789abcdef","VolumeName":"vol1","SnapshotName":"s1","SnapshotCreatedAt":"2024-01-01T00:00:00Z","CreatedTime":"2024-01-01T00:00:01Z","Size":"4194304","Labels":{"RecurringJob":"bak"},"IsIncremental":true,"VolumeSize":"8388608","VolumeCreatedAt":"2024-01-01T00:00:00Z","CompressionMethod":"\"lz4\"","Blocks":[{"Offset":0,"BlockChecksum":"731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b0"},{"Offset":2097152,"BlockChecksum":"731859029215873fdac1c9f2f8bd25a334abf0f3a9e1b057cf2cacc2826d86b0"}],"NewlyUploadedDataSize":"2097152","ReUploadedDataSize":"0"}"#)],
        ),
        ("backup_blk", blocks()),
        ("recurring_jobs", vec![t(JOBS), t("[]")]),
        ("cron", vec![t("*/5 * * * *"), t("0 2 * * 1-5"), t("30 4 29 2 *"), t("0 0 L * FRI#2"), t("15,45 */2 1-15 JAN-JUN ?")]),
        (
            "volume_spec",
            vec![t(&format!(
                r#"{{"numberOfReplicas":"3","staleReplicaTimeout":"30","fromBackup":"","accessMode":"rwx","recurringJobs":{}}}"#,
                serde_json::to_string(JOBS).expect("a string")
            ))],
        ),
        (
            "target_url",
            vec![
                t("file:///var/lib/longhorn-backups"),
                t("nfs://server:/export/path?nfsOptions=port=2049,vers=4.1,soft,timeo=300"),
                t("nfs://[::1]/a/b/"),
                t("s3://bucket@us-east-1/some/prefix\nhttp://127.0.0.1:9000/"),
                t("s3://bucket@us-west-2/?backup=backup-1&volume=vol1"),
                t("nfs://h:/e?nfsOptions=vers=4&backup=b&volume=v"),
            ],
        ),
    ];
    for (target, inputs) in seeds {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (i, data) in inputs.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), data).expect("write a seed");
        }
    }
}
