//! STREAM backups and backups from a standby, against real PostgreSQL 15 servers on
//! loopback sockets (a primary and a streaming standby, each in its own directory).
//!
//! - `stream_backups_restore_without_any_archive`: a primary with `archive_mode = off`;
//!   `--stream` FULL, PAGE, DELTA; the archive is removed and each restores with
//!   `--recovery-target immediate` to the primary's contents at the backup's end.
//! - `standby_stream_backups_on_an_idle_primary`: FULL then PAGE with `--stream` from a
//!   standby of an idle primary finish promptly; restored to a restore point made on the
//!   primary afterwards.
//! - `standby_backup_waits_for_the_archive`: without `--stream`, from a standby with
//!   `archive_mode = always`: on an idle primary the backup says it waits for the stop
//!   segment and fails at `--archive-timeout`; it succeeds once the primary switches WAL,
//!   and restores to a restore point.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::env::*;
use super::harness::*;

pub(super) fn backup_out(cat: &Path, pg: &Pg, mode: &str, extra: &[&str]) -> std::process::Output {
    let mut a: Vec<String> = [
        "backup",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "-b",
        mode,
        "-j",
        "2",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    a.extend(pg.conn_args());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    walnut(&a)
}

pub(super) fn backup(cat: &Path, pg: &Pg, mode: &str, extra: &[&str]) -> String {
    ok(backup_out(cat, pg, mode, extra), &format!("{mode} backup"))
        .trim()
        .to_string()
}

pub(super) fn show(cat: &Path) -> Vec<serde_json::Value> {
    let out = ok(
        walnut(&["show", "-B", cat.to_str().unwrap(), "--format", "json"]),
        "show",
    );
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Restores backup `id` into `dir/name` with the recovery options `rec`, starts it with
/// archiving off and waits until it is promoted; returns the running server.
pub(super) fn restore_promoted(
    cat: &Path,
    like: &Pg,
    dir: &Path,
    name: &str,
    id: &str,
    rec: &[&str],
) -> Pg {
    let target = dir.join(name);
    let mut a = vec![
        "restore",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "-D",
        target.to_str().unwrap(),
        "-i",
        id,
        "--recovery-target-action",
        "promote",
    ];
    a.extend_from_slice(rec);
    ok(walnut(&a), &format!("restore {name}"));
    let sock = pg_mkdir(&dir.join(format!("{name}-sock")));
    let mut r = like.existing_like(&target, &sock);
    r.append_conf("archive_mode = off\nhot_standby = on");
    r.start();
    super::env::wait_promoted(&r);
    r
}

fn primary(dir: &Path, conf: &str) -> (Pg, PathBuf) {
    let pg = Pg::init_on(
        &Server::debian15(),
        None,
        dir,
        "primary",
        &["-k", "--wal-segsize=1"],
    );
    let cat = catalog_for(dir, &pg);
    pg.append_conf(&format!(
        "wal_keep_size = '256MB'\ncheckpoint_timeout = '1h'\nmax_wal_size = '1GB'\n{conf}"
    ));
    (pg, cat)
}

/// A streaming standby of `p` in `dir/standby`, with extra settings; started and caught up.
fn standby_of(p: &Pg, dir: &Path, conf: &str) -> Pg {
    let data = dir.join("standby");
    run_ok(
        p.client("pg_basebackup")
            .arg("-D")
            .arg(&data)
            .arg("-R")
            .arg("-X")
            .arg("stream")
            .arg("-c")
            .arg("fast"),
    );
    let sock = pg_mkdir(&dir.join("standby-sock"));
    let mut s = p.existing_like(&data, &sock);
    s.append_conf(&format!("hot_standby = on\n{conf}"));
    s.start();
    caught_up(p, &s);
    s
}

/// Waits until the standby has replayed everything the primary has written.
pub(super) fn caught_up(p: &Pg, s: &Pg) {
    let target = p.psql("postgres", "select pg_current_wal_lsn()");
    let t0 = Instant::now();
    loop {
        let d = s.psql(
            "postgres",
            &format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
        );
        if d == "t" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "standby did not catch up\n{}",
            s.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn stream_flags(cat: &Path) -> Vec<(String, bool)> {
    show(cat)
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["stream"].as_bool().expect("stream is a boolean"),
            )
        })
        .collect()
}

/// Acceptance 1 and 2: `--stream` FULL and PAGE of a primary that does not archive, each
/// restored with no archive at all.
#[test]
fn stream_backups_restore_without_any_archive() {
    let dir = pg_tempdir("st-noarch");
    let (mut pg, cat) = primary(dir.path(), "archive_mode = off");
    pg.start();
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let full = backup(&cat, &pg, "full", &["--stream"]);
    let dump_full = Env::dumpall(&pg);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql(
        "postgres",
        "create table after_full as select generate_series(1, 5000) i",
    );
    let page = backup(&cat, &pg, "page", &["--stream", "--compress", "lz4"]);
    let dump_page = Env::dumpall(&pg);
    pg.psql(
        "postgres",
        "update pgbench_accounts set abalance = abalance + 1 where aid % 7 = 0",
    );
    let delta = backup(&cat, &pg, "delta", &["--stream"]);
    let dump_delta = Env::dumpall(&pg);
    // a backup without --stream needs the archive, which this server does not feed
    fails_with(
        backup_out(&cat, &pg, "delta", &[]),
        "DELTA without --stream",
        &["archive_mode is 'off'"],
    );

    let flags = stream_flags(&cat);
    assert!(flags.contains(&(full.clone(), true)), "{flags:?}");
    assert!(flags.contains(&(page.clone(), true)), "{flags:?}");
    assert!(flags.contains(&(delta.clone(), true)), "{flags:?}");
    let table = ok(walnut(&["show", "-B", cat.to_str().unwrap()]), "show");
    assert!(table.contains("STREAM"), "{table}");
    // the backups carry their WAL in their manifests
    let rows = show(&cat);
    let p = rows.iter().find(|b| b["id"] == page.as_str()).unwrap();
    assert_eq!(p["mode"], "PAGE");
    assert_eq!(p["parent_id"], full.as_str());
    ok(
        walnut(&["validate", "-B", cat.to_str().unwrap(), "--instance", "db"]),
        "validate",
    );

    // no archive at all from here on
    let wal = cat.join("instances/db/wal");
    std::fs::rename(&wal, dir.path().join("wal-away")).unwrap();
    std::fs::create_dir(&wal).unwrap();
    pg.stop();
    // validate finds every STREAM backup's WAL in the backup itself
    ok(
        walnut(&["validate", "-B", cat.to_str().unwrap(), "--instance", "db"]),
        "validate with no archive",
    );

    for (id, dump, name) in [
        (&full, &dump_full, "r-full"),
        (&page, &dump_page, "r-page"),
        (&delta, &dump_delta, "r-delta"),
    ] {
        let mut r = restore_promoted(
            &cat,
            &pg,
            dir.path(),
            name,
            id,
            &["--recovery-target", "immediate"],
        );
        same_dump(&Env::dumpall(&r), dump, name);
        r.stop();
    }
}

/// Acceptance 3: FULL then PAGE with `--stream` from a standby whose primary is idle finish
/// promptly (no record ever starts at the standby's stop LSN; a standby cannot switch
/// WAL); each restores to a restore point made on the primary afterwards. The primary
/// archives into the catalog too: the stream and archive_command deliver the same segments.
#[test]
fn standby_stream_backups_on_an_idle_primary() {
    let dir = pg_tempdir("st-standby");
    let (mut p, cat) = primary(
        dir.path(),
        &format!(
            "archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'",
            walnut_bin("walnut-archive").display(),
            dir.path().join("cat").display()
        ),
    );
    p.start();
    p.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let mut s = standby_of(&p, dir.path(), "");
    let sdata = s.data.to_str().unwrap().to_string();

    // the registered data directory is the primary's; --pgdata must be the server's own
    fails_with(
        backup_out(
            &cat,
            &s,
            "full",
            &["--stream", "--pgdata", p.data.to_str().unwrap()],
        ),
        "backup of the standby naming the primary's directory",
        &["--pgdata", "is not the data directory of the server"],
    );

    let t0 = Instant::now();
    let full = backup(&cat, &s, "full", &["--stream", "--pgdata", &sdata]);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "FULL from the standby took {:?}",
        t0.elapsed()
    );
    let t1 = Instant::now();
    let page = backup(&cat, &s, "page", &["--stream", "--pgdata", &sdata]);
    assert!(
        t1.elapsed() < Duration::from_secs(60),
        "PAGE from the standby took {:?}",
        t1.elapsed()
    );
    assert!(
        !s.data.join("standby.signal").exists() || {
            // the standby has one; the backups must not
            let m = super::env::manifest_entries(
                &cat.join(format!("instances/db/backups/{full}/manifest")),
            )
            .unwrap();
            !m.iter().any(|e| e.path == "standby.signal")
        }
    );
    let flags = stream_flags(&cat);
    assert!(flags.contains(&(full.clone(), true)), "{flags:?}");
    assert!(flags.contains(&(page.clone(), true)), "{flags:?}");

    // changes after the backups, then a restore point on the primary
    p.pgbench(&["-t", "200", "-n", "postgres"]);
    p.psql(
        "postgres",
        "select pg_create_restore_point('after_standby')",
    );
    let dump = Env::dumpall(&p);
    switch_and_wait_in_catalog(&p, &cat);
    s.stop();
    for (id, name) in [(&full, "r-full"), (&page, "r-page")] {
        let mut r = restore_promoted(
            &cat,
            &p,
            dir.path(),
            name,
            id,
            &["--recovery-target-name", "after_standby"],
        );
        same_dump(&Env::dumpall(&r), &dump, name);
        r.stop();
    }
    p.stop();
}

/// Acceptance 3 without `--stream`: a standby with `archive_mode = always` archives into
/// the catalog; on an idle primary the stop segment is never finished, so the backup says
/// it waits and fails at `--archive-timeout`; once the primary switches WAL it completes,
/// and restores to a restore point made on the primary.
#[test]
fn standby_backup_waits_for_the_archive() {
    let dir = pg_tempdir("st-standby-arch");
    let (mut p, cat) = primary(dir.path(), "archive_mode = off");
    p.start();
    p.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let mut s = standby_of(
        &p,
        dir.path(),
        &format!(
            "archive_mode = always\narchive_command = '{} -B {} --instance db %p %f'",
            walnut_bin("walnut-archive").display(),
            cat.display()
        ),
    );
    let sdata = s.data.to_str().unwrap().to_string();
    // The standby archives only WAL its walreceiver got, not the segment pg_basebackup
    // copied: a checkpoint on the primary in a later segment gives the standby's backup
    // (its restartpoint) a start the standby itself archives.
    p.psql("postgres", "select pg_switch_wal()");
    p.psql("postgres", "checkpoint");
    caught_up(&p, &s);

    let t0 = Instant::now();
    let e = fails_with(
        backup_out(
            &cat,
            &s,
            "full",
            &["--pgdata", &sdata, "--archive-timeout", "5"],
        ),
        "FULL from a standby of an idle primary",
        &["was not archived within", "a standby cannot switch WAL"],
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the archive timeout was not honoured: {:?}\n{e}",
        t0.elapsed()
    );

    // the same with the primary switching WAL while the backup waits
    // (a second handle on the primary, not started by it: dropping it stops nothing)
    let mut pgp = p.existing_like(&p.data, &p.sock);
    pgp.port = p.port;
    let sw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(4));
        pgp.psql("postgres", "select pg_switch_wal()");
    });
    let out = backup_out(
        &cat,
        &s,
        "full",
        &["--pgdata", &sdata, "--archive-timeout", "60"],
    );
    assert!(
        out.status.success(),
        "{}\nstandby log:\n{}",
        stderr(&out),
        s.server_log()
    );
    let full = stdout(&out).trim().to_string();
    sw.join().unwrap();
    let flags = stream_flags(&cat);
    assert!(flags.contains(&(full.clone(), false)), "{flags:?}");

    p.pgbench(&["-t", "100", "-n", "postgres"]);
    p.psql("postgres", "select pg_create_restore_point('rp_arch')");
    let dump = Env::dumpall(&p);
    let seg = p.psql("postgres", "select pg_walfile_name(pg_switch_wal())");
    // the standby archives the segment once it has received it
    let ar = {
        let c = walnut::catalog::Catalog::open(&cat).unwrap();
        walnut::archive::WalArchive::open(&c, "db").unwrap()
    };
    let name: walnut::WalFileName = seg.parse().unwrap();
    let t1 = Instant::now();
    while !ar.is_archived(&name).unwrap() {
        assert!(t1.elapsed() < Duration::from_secs(60), "{seg} not archived");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.stop();
    let mut r = restore_promoted(
        &cat,
        &p,
        dir.path(),
        "r-arch",
        &full,
        &["--recovery-target-name", "rp_arch"],
    );
    same_dump(&Env::dumpall(&r), &dump, "standby FULL without --stream");
    r.stop();
    p.stop();
}
