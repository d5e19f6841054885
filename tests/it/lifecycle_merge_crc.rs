//! `walnut merge` of an uncompressed chain writes the merged FULL's block checksums
//! (`block_crcs`), so a checksum-mode incremental restore of the merged FULL reads only
//! the differing blocks, and gives byte for byte what a full restore gives.
use super::env::*;
use super::harness::*;
use super::restore_incremental::{bytes_written, incremental, promoted_copy};
use super::restore_incremental_crc::{kept_unread, rel_snapshot};

#[test]
fn merged_full_has_block_checksums_for_checksum_mode_restore() {
    let env = Env::new("life-merge-crc");
    let cat = env.cat();
    env.pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    env.pg.psql(
        "postgres",
        "create table shrinks as select i, repeat('x', 200) as pad from generate_series(1, 20000) i",
    );
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");
    // a copy of the FULL that goes its own way (restored before the merge replaces it)
    let copy = promoted_copy(&env, &full, "copy", |pg| {
        pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
        pg.psql("postgres", "create table only_in_copy as select 1 as i");
        pg.psql("postgres", "checkpoint");
    });
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    env.pg
        .psql("postgres", "update shrinks set pad = 'y' where i % 50 = 0");
    let _page = env.backup1("page");
    env.pg.pgbench(&["-n", "-t", "200", "-c", "1", "postgres"]);
    // the table shrinks: the DELTA's file is shorter than the FULL's
    env.pg
        .psql("postgres", "delete from shrinks where i > 5000");
    env.pg.psql("postgres", "vacuum shrinks");
    let delta = env.backup1("delta");
    env.switch_and_wait(&env.pg);
    let want = Env::dumpall(&env.pg);

    let r: serde_json::Value = serde_json::from_str(&ok(
        walnut(&[
            "merge",
            "-B",
            cat,
            "--instance",
            "db",
            "-i",
            &delta,
            "--format",
            "json",
        ]),
        "merge",
    ))
    .unwrap();
    let m = r["merged_id"].as_str().unwrap().to_string();
    // backup.json names the object, as a backup's does, and it is there at that size
    let bj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.backup_dir(&m).join("backup.json")).unwrap())
            .unwrap();
    let size = bj["block_crcs"]["size"]
        .as_u64()
        .unwrap_or_else(|| panic!("merged backup.json has no block_crcs: {bj}"));
    assert!(bj["block_crcs"]["crc32c"].is_u64(), "{bj}");
    let obj = env.backup_dir(&m).join("block_crcs");
    assert_eq!(std::fs::metadata(&obj).unwrap().len(), size);
    // validate checks the object against the manifest's CRCs
    ok(env.validate(&["-i", &m]), "validate the merged FULL");
    ok(env.validate(&[]), "validate");

    let fresh = env.path("fresh");
    ok(env.restore_cmd(&fresh, &["-i", &m]), "full restore");
    let out = ok(
        incremental(&env, &copy.data, "checksum", &["-i", &m]),
        "incremental restore (checksum) of the merged FULL",
    );
    eprintln!("checksum: {}", out.trim());
    let (written, total) = bytes_written(&out);
    let kept = kept_unread(&out);
    assert!(written > 0, "nothing written");
    assert!(
        kept > 0,
        "{kept} blocks kept unread: the block checksums were not used"
    );
    assert!(
        written * 2 < total,
        "{written} of {total} bytes written, expected under a half"
    );
    let a = rel_snapshot(&fresh);
    let b = rel_snapshot(&copy.data);
    let diff: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(diff.is_empty(), "differs from a full restore: {diff:?}");

    let sock = pg_mkdir(&env.path("crc-sock"));
    let mut r = env.pg.existing_like(&copy.data, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    same_dump(&Env::dumpall(&r), &want, "checksum over the merged FULL");
    r.stop();
}
