//! The same-host lock files of an S3 catalog are shared by every OS user: a
//! `walnut-archive` run by root (umask 022) must not lock the postgres user's
//! `archive_command` out of storing block indexes. Garage ignores conditional create, so
//! index writes there take the same-host lock.

use std::process::Command;

use walnut::repo::Repo;

use super::harness::*;
use super::s3::*;

#[test]
fn s3_index_locks_are_shared_by_root_and_postgres_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    let conf = s.config_file(10);
    let url = "s3://walnut/lockusers";
    let dir = pg_tempdir("s3-lockusers");
    let mut pg = s3_primary(&conf, url, dir.path());
    pg.append_conf("wal_keep_size = '64MB'\n");
    pg.start();
    // two complete segments: each written to, then switched away from
    let mut segs = Vec::new();
    for _ in 0..2 {
        pg.psql(
            "postgres",
            "create table if not exists t (g int); insert into t select generate_series(1, 20000)",
        );
        segs.push(
            pg.psql("postgres", "select pg_walfile_name(pg_current_wal_lsn())")
                .trim()
                .to_string(),
        );
        pg.psql("postgres", "select pg_switch_wal()");
    }
    pg.stop();
    let wal = pg.data.join("pg_wal");
    // a lock directory of this test's own, that both users can enter
    let locks = dir.path().join("locks");
    let push = |mut c: Command, seg: &str| {
        c.env("WALNUT_LOCK_DIR", &locks)
            .args([
                "-B",
                url,
                "--instance",
                "db",
                "--look-ahead",
                "0",
                "--config",
            ])
            .arg(&conf)
            .arg(wal.join(seg))
            .arg(seg);
        let out = c.output().expect("run walnut-archive");
        assert!(out.status.success(), "push {seg}: {}", stderr(&out));
        stderr(&out)
    };
    // first as root (when the tests run as root; else both as the same user)
    let first = push(Command::new(walnut_bin("walnut-archive")), &segs[0]);
    let second = push(as_pg(walnut_bin("walnut-archive")), &segs[1]);
    for (seg, log) in [(&segs[0], &first), (&segs[1], &second)] {
        assert!(!log.contains("could not store its index"), "{seg}: {log}");
        let key = format!("instances/db/wal/00000001/{seg}.idx");
        assert!(
            s.repo("lockusers").head(&key).unwrap().is_some(),
            "{seg}: no index stored; log: {log}"
        );
    }
}
