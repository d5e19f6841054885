//! Restore power with the catalog on S3 (s3s-fs): a checksum-mode incremental restore reads
//! the backups' block checksums and only the blocks that differ from the bucket, and ends
//! byte for byte where a full restore from the bucket ends; `backup -b page --dry-run`
//! predicts the real PAGE and `show --archive --churn` names the changed table, both from
//! the block index on S3; `verify-restore` drills the PAGE from the bucket.
use std::path::Path;

use serde_json::Value;
use walnut::repo::Repo;

use super::env::{same_dump, wait_promoted, Env};
use super::harness::*;
use super::restore_incremental::bytes_written;
use super::restore_incremental_crc::{kept_unread, rel_snapshot};
use super::s3::{
    archive_to_s3, backup_s3, restore_s3, s3_primary, stderr, walnut_s3, walnut_s3_on, S3Server,
};

fn show_row(conf: &Path, url: &str, id: &str) -> Value {
    let out = ok(
        walnut_s3(
            conf,
            &["show", "-B", url, "--instance", "db", "--format", "json"],
        ),
        "show on S3",
    );
    let rows: Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {out}"))
        .clone()
}

#[test]
fn s3_checksum_incremental_restore_dry_run_and_churn() {
    let Some(s) = S3Server::s3s_fs() else { return };
    let conf = s.config_file(10);
    let url = "s3://walnut/power";
    let dir = pg_tempdir("s3-power");
    let mut pg = s3_primary(&conf, url, dir.path());
    archive_to_s3(&mut pg, &conf, url);
    pg.start();
    pg.pgbench(&["-i", "-s", "3", "-q", "postgres"]);
    pg.psql("postgres", "checkpoint");
    let full = backup_s3(&conf, url, &pg, "full");
    assert!(
        s.repo("power")
            .head(&format!("instances/db/backups/{full}/block_crcs"))
            .unwrap()
            .is_some(),
        "the FULL on S3 has no block checksums"
    );

    // the old copy: the FULL restored from S3, promoted, changed, stopped cleanly
    let copy_dir = dir.path().join("copy");
    ok(
        restore_s3(
            &conf,
            url,
            &full,
            &copy_dir,
            &[
                "--recovery-target",
                "immediate",
                "--recovery-target-action",
                "promote",
            ],
        ),
        "restore the copy from S3",
    );
    {
        let sock = pg_mkdir(&dir.path().join("copy-sock"));
        let mut copy = pg.existing_like(&copy_dir, &sock);
        copy.append_conf("archive_mode = off");
        copy.start();
        wait_promoted(&copy);
        copy.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
        copy.psql("postgres", "create table only_in_copy as select 1 as i");
        copy.stop();
    }

    // the source goes on; a hammered table tops the churn list
    pg.psql(
        "postgres",
        "create table hot (id int primary key, v int) with (autovacuum_enabled = off); \
         insert into hot select g, 0 from generate_series(1, 20000) g",
    );
    for _ in 0..3 {
        pg.psql("postgres", "update hot set v = v + 1");
    }
    pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
    pg.switch_and_wait_archived();
    let a = [
        "show",
        "-B",
        url,
        "--instance",
        "db",
        "--archive",
        "--churn",
        "--format",
        "json",
    ];
    let churn: Value =
        serde_json::from_str(&ok(walnut_s3_on(&conf, &pg, &a), "churn on S3")).unwrap();
    let top = &churn["relations"][0];
    assert!(
        top["relation"] == "hot" || top["relation"] == "pgbench_accounts",
        "{churn}"
    );
    assert!(
        churn["relations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["relation"] == "hot"),
        "{churn}"
    );

    // the PAGE predicted from the index on S3, then taken
    let a = [
        "backup",
        "-B",
        url,
        "--instance",
        "db",
        "-b",
        "page",
        "--dry-run",
        "--format",
        "json",
    ];
    let dry: Value =
        serde_json::from_str(&ok(walnut_s3_on(&conf, &pg, &a), "dry run on S3")).unwrap();
    assert_eq!(dry["mode"], "PAGE", "{dry}");
    assert_eq!(dry["parent_id"], full.as_str(), "{dry}");
    let page = backup_s3(&conf, url, &pg, "page");
    let real = show_row(&conf, url, &page)["data_bytes"].as_f64().unwrap();
    let predicted = dry["data_bytes"].as_f64().unwrap();
    assert!(
        (predicted - real).abs() <= 0.05 * real,
        "data_bytes: predicted {predicted}, real {real}"
    );
    pg.switch_and_wait_archived();
    let want = Env::dumpall(&pg);

    // a full restore of the PAGE from S3, and the checksum-mode restore over the old copy
    let fresh = dir.path().join("fresh");
    ok(
        restore_s3(&conf, url, &page, &fresh, &[]),
        "full restore from S3",
    );
    let out = restore_s3(
        &conf,
        url,
        &page,
        &copy_dir,
        &["--incremental-mode", "checksum"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("checksum from S3: {}", out.trim());
    let (written, total) = bytes_written(&out);
    let kept = kept_unread(&out);
    assert!(written > 0, "nothing written: {out}");
    assert!(
        written * 3 < total,
        "{written} of {total} bytes written, expected under a third"
    );
    assert!(kept > 500, "{kept} blocks kept unread");
    let (a, b) = (rel_snapshot(&fresh), rel_snapshot(&copy_dir));
    let diff: Vec<_> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .collect();
    assert!(diff.is_empty(), "differs from a full restore: {diff:?}");
    // it recovers through walnut-fetch from S3 to the source's data
    let sock = pg_mkdir(&dir.path().join("r-sock"));
    let mut r = pg.existing_like(&copy_dir, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    same_dump(&Env::dumpall(&r), &want, "checksum-mode restore from S3");
    r.stop();
    pg.stop();

    // the restore drill from S3: restore, recover through walnut-fetch, amcheck, counts,
    // pg_checksums; its result recorded in the bucket and shown
    let out = walnut_s3(
        &conf,
        &[
            "verify-restore",
            "-B",
            url,
            "--instance",
            "db",
            "-i",
            &page,
            "--format",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "verify-restore on S3: {}",
        stderr(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["data_checksums"], true, "{v}");
    let dbs = v["databases"].as_array().unwrap();
    let pgdb = dbs.iter().find(|d| d["name"] == "postgres").unwrap();
    assert!(pgdb["rows"].as_u64().unwrap() >= 300_000, "{pgdb}");
    assert_eq!(
        show_row(&conf, url, &page)["verify_restore"],
        "PASSED",
        "the drill's result on S3"
    );
}
