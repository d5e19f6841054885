//! Checksum-mode incremental restore with the backups' block checksums (`block_crcs`):
//! only the differing blocks are read from the chain, the result is byte for byte a full
//! restore's, and a damaged, forged or missing block checksums object is refused before
//! any write, naming it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::env::*;
use super::harness::*;
use super::restore_incremental::{bytes_written, incremental, promoted_copy, snapshot};

/// [`snapshot`] with paths relative to `root`.
pub(super) fn rel_snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    snapshot(root)
        .into_iter()
        .map(|(p, v)| (p.strip_prefix(root).unwrap().to_path_buf(), v))
        .collect()
}

pub(super) fn kept_unread(out: &str) -> u64 {
    out.trim()
        .split(", ")
        .find(|s| s.ends_with("blocks kept unread"))
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// A FULL, then a PAGE and a DELTA (a table truncated between them: the limit block rule),
/// restored in checksum mode over a promoted copy of the FULL that changed: the result is
/// identical, file by file, to a full restore of the same chain, recovers to the source's
/// dump, and the restore read and wrote only a fraction of the data.
/// `data` (restored incrementally) holds exactly the relation files of `fresh` (a full
/// restore of the same backup); it then starts, is promoted and dumps as `want`.
pub(super) fn same_as_full_restore_and_dump(
    env: &Env,
    fresh: &Path,
    data: &Path,
    want: &str,
    what: &str,
) {
    let a = rel_snapshot(fresh);
    let b = rel_snapshot(data);
    let diff: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(
        diff.is_empty(),
        "{what}: differs from a full restore: {diff:?}"
    );
    let sock = pg_mkdir(&env.path("crc-sock"));
    let mut r = env.pg.existing_like(data, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    same_dump(&Env::dumpall(&r), want, what);
    r.stop();
}

/// The chain the checksum-mode tests restore: pgbench at `scale` and a table `shrinks`,
/// a FULL; a promoted copy of that FULL changed by `change_copy`; a PAGE; then a DELTA
/// after `shrinks` lost three quarters of its rows (its file is shorter than the FULL's).
/// Both backups carry block checksums. Returns the FULL's id, the copy, the DELTA's id and
/// the primary's dump at the end.
pub(super) fn crc_chain(
    env: &Env,
    scale: u32,
    change_copy: impl FnOnce(&Pg),
) -> (String, Pg, String, String) {
    env.pg
        .pgbench(&["-i", "-s", &scale.to_string(), "-q", "postgres"]);
    env.pg.psql(
        "postgres",
        "create table shrinks as select i, repeat('x', 200) as pad from generate_series(1, 20000) i",
    );
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");
    assert!(env.backup_dir(&full).join("block_crcs").is_file());
    let copy = promoted_copy(env, &full, "copy", change_copy);
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    env.pg
        .psql("postgres", "update shrinks set pad = 'y' where i % 50 = 0");
    let _page = env.backup1("page");
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    env.pg
        .psql("postgres", "delete from shrinks where i > 5000");
    env.pg.psql("postgres", "vacuum shrinks");
    let delta = env.backup1("delta");
    assert!(env.backup_dir(&delta).join("block_crcs").is_file());
    env.switch_and_wait(&env.pg);
    let want = Env::dumpall(&env.pg);
    (full, copy, delta, want)
}

#[test]
fn checksum_mode_by_block_checksums_equals_a_full_restore() {
    let env = Env::new("rinc-crc");
    let (_full, copy, delta, want) = crc_chain(&env, 4, |pg| {
        pg.pgbench(&["-n", "-t", "400", "-c", "1", "postgres"]);
        pg.psql("postgres", "create table only_in_copy as select 1 as i");
        pg.psql("postgres", "delete from shrinks where i % 7 = 0");
        pg.psql("postgres", "checkpoint");
    });

    let fresh = env.path("fresh");
    ok(env.restore_cmd(&fresh, &["-i", &delta]), "full restore");
    // the plan computes the bytes to write as the restore will (and writes nothing)
    let before = rel_snapshot(&copy.data);
    let plan = ok(
        incremental(
            &env,
            &copy.data,
            "checksum",
            &["-i", &delta, "--plan", "--format", "json"],
        ),
        "plan",
    );
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert!(rel_snapshot(&copy.data) == before, "--plan wrote");
    let out = ok(
        incremental(&env, &copy.data, "checksum", &["-i", &delta]),
        "incremental restore (checksum)",
    );
    eprintln!("checksum: {}", out.trim());
    let (written, total) = bytes_written(&out);
    let kept = kept_unread(&out);
    assert_eq!(
        plan["bytes_to_write"].as_u64(),
        Some(written),
        "the plan's bytes to write"
    );
    assert!(written > 0, "nothing written");
    assert!(
        written * 4 < total,
        "{written} of {total} bytes written, expected under a quarter"
    );
    assert!(kept > 1000, "{kept} blocks kept unread");
    // byte for byte what a full restore writes
    same_as_full_restore_and_dump(&env, &fresh, &copy.data, &want, "checksum");
}

/// Offset in a block checksums object of the CRC of block `b` of whole file `path`.
fn crc_offset(obj: &[u8], path: &str, b: usize) -> usize {
    let mut at = 16;
    while at < obj.len() - 8 {
        let plen = u16::from_le_bytes([obj[at], obj[at + 1]]) as usize;
        let p = std::str::from_utf8(&obj[at + 2..at + 2 + plen]).unwrap();
        let kind = obj[at + 2 + plen];
        let count = u32::from_le_bytes(obj[at + 3 + plen..at + 7 + plen].try_into().unwrap());
        let data = at + 7 + plen;
        if p == path {
            assert_eq!(kind, 0, "{path} is not a whole file");
            return data + 4 * b;
        }
        at = data + count as usize * if kind == 0 { 4 } else { 8 };
    }
    panic!("{path} not in the block checksums");
}

/// The object with a new trailer CRC.
fn reseal(obj: &mut [u8]) -> u32 {
    let n = obj.len() - 4;
    let c = crc32c::crc32c(&obj[..n]);
    obj[n..].copy_from_slice(&c.to_le_bytes());
    c
}

/// backup.json with `block_crcs.crc32c` set to `crc` and its own checksum recomputed.
fn forge_meta(path: &Path, crc: u32) {
    let s = std::fs::read_to_string(path).unwrap();
    let trailer = ",\n  \"crc32c\": \"".len() + 8 + "\"\n}\n".len();
    let body = &s[..s.len() - trailer];
    let at = body.find("\"block_crcs\"").unwrap();
    let k = at + body[at..].find("\"crc32c\": ").unwrap() + "\"crc32c\": ".len();
    let end = k + body[k..].find(|c: char| !c.is_ascii_digit()).unwrap();
    let body = format!("{}{crc}{}", &body[..k], &body[end..]);
    let out = format!(
        "{body},\n  \"crc32c\": \"{:08x}\"\n}}\n",
        crc32c::crc32c(body.as_bytes())
    );
    std::fs::write(path, out).unwrap();
}

/// A block checksums object damaged, forged to say that a block the destination changed
/// is the backup's (its own checksum resealed, and then backup.json forged to match), or
/// missing: each is refused before any write, naming the object. A stored block that does
/// not match its checksum fails the restore (pg_control stays removed). The intact object
/// restores. `walnut validate` finds a forged object too (CORRUPT, then OK once intact).
#[test]
fn damaged_or_forged_block_checksums_are_refused() {
    let env = Env::new("rinc-crc-forged");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");
    let copy = promoted_copy(&env, &full, "copy", |pg| {
        pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
        pg.psql("postgres", "checkpoint");
    });
    env.switch_and_wait(&env.pg);
    let rel = env.pg.psql(
        "postgres",
        "select pg_relation_filepath('pgbench_accounts')",
    );
    let bdir = env.backup_dir(&full);
    let stored_path = bdir.join(format!("database/{rel}"));
    let stored = std::fs::read(&stored_path).unwrap();
    let dest = std::fs::read(copy.data.join(&rel)).unwrap();
    let bs = 8192;
    let b = (0..stored.len() / bs)
        .find(|&b| stored[b * bs..(b + 1) * bs] != dest[b * bs..(b + 1) * bs])
        .expect("the copy changed no block of pgbench_accounts");
    let wrong = crc32c::crc32c(&dest[b * bs..(b + 1) * bs]);

    let obj_path = bdir.join("block_crcs");
    let meta_path = bdir.join("backup.json");
    let good_obj = std::fs::read(&obj_path).unwrap();
    let good_meta = std::fs::read(&meta_path).unwrap();
    let before = rel_snapshot(&copy.data);
    let pg_control = std::fs::read(copy.data.join("global/pg_control")).unwrap();
    let refused = |what: &str, needles: &[&str]| {
        let out = incremental(&env, &copy.data, "checksum", &["-i", &full]);
        let e = fails_with(out, what, needles);
        assert_eq!(e.trim().lines().count(), 1, "{what}: {e}");
        assert!(
            rel_snapshot(&copy.data) == before,
            "{what}: the destination changed"
        );
    };

    // a damaged byte
    let mut d = good_obj.clone();
    let mid = d.len() / 2;
    d[mid] ^= 0x10;
    std::fs::write(&obj_path, &d).unwrap();
    refused("damaged", &["block_crcs", "checksum mismatch"]);

    // the destination's wrong block's CRC put in, the object's checksum resealed
    let mut f = good_obj.clone();
    let at = crc_offset(&f, &rel, b);
    f[at..at + 4].copy_from_slice(&wrong.to_le_bytes());
    let c = reseal(&mut f);
    std::fs::write(&obj_path, &f).unwrap();
    refused("forged, resealed", &["block_crcs", "backup.json"]);

    // ... and backup.json forged to match: the manifest's CRC of the stored file catches it
    forge_meta(&meta_path, c);
    refused(
        "forged, backup.json too",
        &["block_crcs", &rel, "do not match its manifest entry"],
    );
    std::fs::write(&meta_path, &good_meta).unwrap();

    // missing
    std::fs::remove_file(&obj_path).unwrap();
    refused("missing", &["block_crcs", "missing"]);
    std::fs::write(&obj_path, &good_obj).unwrap();

    // a stored block that differs from its checksum: read (the destination's differs),
    // checked, refused
    let mut s = stored.clone();
    s[b * bs + 100] ^= 0x01;
    std::fs::write(&stored_path, &s).unwrap();
    let out = incremental(&env, &copy.data, "checksum", &["-i", &full]);
    fails_with(
        out,
        "damaged stored block",
        &[
            &rel,
            &format!("block {b} does not match its block checksum"),
        ],
    );
    assert!(
        !copy.data.join("global/pg_control").exists(),
        "a failed restore left pg_control"
    );
    std::fs::write(&stored_path, &stored).unwrap();
    std::fs::write(copy.data.join("global/pg_control"), &pg_control).unwrap();

    // intact: restores, and the block is the backup's
    ok(
        incremental(&env, &copy.data, "checksum", &["-i", &full]),
        "intact",
    );
    let got = std::fs::read(copy.data.join(&rel)).unwrap();
    assert_eq!(&got[b * bs..(b + 1) * bs], &stored[b * bs..(b + 1) * bs]);
    assert_eq!(got, stored);

    // validate checks the object too: a forged one makes the backup CORRUPT, naming it;
    // the intact one again makes it OK
    ok(env.validate(&[]), "validate intact");
    std::fs::write(&obj_path, &f).unwrap();
    forge_meta(&meta_path, c);
    fails_with(
        env.validate(&[]),
        "validate forged",
        &["block_crcs", "do not match its manifest entry"],
    );
    assert_eq!(env.status(&full), "CORRUPT");
    std::fs::write(&obj_path, &good_obj).unwrap();
    std::fs::write(&meta_path, &good_meta).unwrap();
    ok(env.validate(&[]), "validate intact again");
    assert_eq!(env.status(&full), "OK");
}
