//! Taking backups from hostile or damaged data directories (issue 8): concurrent backups
//! get their own directories, symbolic links are never followed into loops, pages whose
//! LSN lies beyond anything the server wrote fail the backup, and a failed backup keeps no
//! data in the catalog.
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::env::*;
use super::harness::*;

/// Bytes of the regular files below `p` (links not followed).
fn du(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                n += du(&e.path());
            } else if md.is_file() {
                n += md.len();
            }
        }
    }
    n
}

/// The entries below a backup directory, as names relative to it.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `n` in upper-case base 36, as backup ids are made from the start time.
fn base36(mut n: u64) -> String {
    let mut v = Vec::new();
    loop {
        v.push(
            std::char::from_digit((n % 36) as u32, 36)
                .unwrap()
                .to_ascii_uppercase(),
        );
        n /= 36;
        if n == 0 {
            break;
        }
    }
    v.iter().rev().collect()
}

/// Starts `n` `walnut ARGS` at once (one shell forks them all, as the cluster owner);
/// returns (exit code, stdout, stderr) of each.
fn walnut_at_once(n: usize, args: &[String], out_dir: &Path) -> Vec<(i32, String, String)> {
    let script = format!(
        "for i in $(seq 1 {n}); do {{ \"$0\" \"$@\" >{d}/out.$i 2>{d}/err.$i; echo $? >{d}/rc.$i; }} & done; wait",
        d = out_dir.display()
    );
    let mut c = as_pg("sh");
    c.arg("-c").arg(script).arg(walnut_bin("walnut")).args(args);
    run_ok(&mut c);
    (1..=n)
        .map(|i| {
            let read = |what: &str| {
                std::fs::read_to_string(out_dir.join(format!("{what}.{i}"))).unwrap_or_default()
            };
            let rc = read("rc").trim().parse().unwrap_or(-1);
            (rc, read("out").trim().to_string(), read("err"))
        })
        .collect()
}

/// 8 FULL backups of one server started at once, twice: each gets its own backup
/// directory (ids are created create-only), every one succeeds, and each validates. In the
/// first round every plain id of the next two minutes is already taken by a dangling link
/// (which `exists()` calls absent): the backups must still each get a fresh directory.
#[test]
fn concurrent_backups_get_their_own_directories() {
    let env = Env::with("tk-concurrent", &[], "max_connections = 40");
    env.pg.psql(
        "postgres",
        "create table t(i int primary key); insert into t select generate_series(1, 1000)",
    );
    let bdir = env.backups_dir();
    pg_mkdir(&bdir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut planted = Vec::new();
    for k in 0..120 {
        let name = base36(now + k);
        std::os::unix::fs::symlink("/nonexistent-walnut-test", bdir.join(&name)).unwrap();
        planted.push(name);
    }
    let outs = pg_mkdir(&env.dir.path().join("outs"));
    let mut ids = Vec::new();
    for round in 0..2 {
        let d = pg_mkdir(&outs.join(round.to_string()));
        for (rc, id, err) in walnut_at_once(8, &env.backup_args_on(&env.pg, "full", &[]), &d) {
            assert_eq!(
                rc, 0,
                "concurrent FULL backup (round {round}) failed:\n{err}"
            );
            assert!(!id.is_empty(), "{err}");
            ids.push(id);
        }
        if round == 0 {
            for p in &planted {
                std::fs::remove_file(bdir.join(p)).unwrap();
            }
        }
    }
    let mut uniq = ids.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), ids.len(), "backups shared an id: {ids:?}");
    // one directory per backup, each with its own record
    let dirs = listing(&bdir);
    assert_eq!(dirs, uniq, "backup directories");
    let rows = env.show();
    assert_eq!(rows.len(), ids.len());
    for r in &rows {
        assert_eq!(r["status"], "OK", "{r}");
    }
    env.switch_and_wait(&env.pg);
    for id in &ids {
        ok(
            walnut(&["validate", "-B", env.cat(), "--instance", "db", "-i", id]),
            &format!("validate {id}"),
        );
    }
}

/// Runs `cmd` (started by this test), killing it after `limit`; returns its output and
/// whether it finished in time.
fn run_limited(mut cmd: Command, limit: Duration) -> (Output, bool) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return (child.wait_with_output().expect("output"), true);
        }
        if t0.elapsed() > limit {
            // our own child (runuser, which passes the signal on), by its id
            let _ = child.kill();
            return (child.wait_with_output().expect("output"), false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Symbolic links in PGDATA get pg_basebackup's rules: `loop -> .` and a link to a file
/// outside are skipped with a warning (never followed, so the backup is quick and small);
/// `pg_wal` (initdb --waldir) and `pg_stat_tmp` as links are kept as directories without
/// their contents; tablespace links are followed. The restore has the same data.
#[test]
fn symlinks_are_not_followed() {
    let dir_probe = pg_tempdir("tk-links-outside");
    let waldir = pg_mkdir(&dir_probe.path().join("wal"));
    let env = Env::with("tk-links", &["-X", waldir.to_str().unwrap()], "");
    let pg = &env.pg;
    let ts = pg_mkdir(&env.dir.path().join("ts1"));
    pg.psql(
        "postgres",
        &format!("create tablespace ts1 location '{}'", ts.display()),
    );
    pg.psql(
        "postgres",
        "create table t(i int primary key, s text); insert into t select g, md5(g::text) from generate_series(1, 5000) g;
         create table in_ts(i int primary key) tablespace ts1; insert into in_ts select generate_series(1, 2000)",
    );
    // outside PGDATA: a 4 MiB file, and a directory with 4 MiB
    let outside = dir_probe.path().join("outside.bin");
    std::fs::write(&outside, vec![7u8; 4 << 20]).unwrap();
    let stat_dir = pg_mkdir(&dir_probe.path().join("stat"));
    std::fs::write(stat_dir.join("big"), vec![1u8; 4 << 20]).unwrap();
    chown_pg(dir_probe.path());
    let data = &pg.data;
    std::os::unix::fs::symlink(".", data.join("loop")).unwrap();
    std::os::unix::fs::symlink(&outside, data.join("outside_link")).unwrap();
    std::os::unix::fs::symlink("../base", data.join("global/base_again")).unwrap();
    std::fs::remove_dir_all(data.join("pg_stat_tmp")).unwrap();
    std::os::unix::fs::symlink(&stat_dir, data.join("pg_stat_tmp")).unwrap();
    assert!(std::fs::symlink_metadata(data.join("pg_wal"))
        .unwrap()
        .file_type()
        .is_symlink());
    let pgdata_bytes = du(data);

    let mut cmd = as_pg(walnut_bin("walnut"));
    cmd.args(env.backup_args_on(&env.pg, "full", &[]));
    let (out, in_time) = run_limited(cmd, Duration::from_secs(120));
    let err = stderr(&out);
    assert!(in_time, "the backup did not finish within 120 s\n{err}");
    let id = ok(out, "FULL of a data directory with symbolic links")
        .trim()
        .to_string();
    for l in [
        "\"loop\" -> \".\"",
        "\"outside_link\"",
        "\"global/base_again\"",
    ] {
        assert!(
            err.contains(&format!("skipping symbolic link {l}")),
            "no warning for {l}:\n{err}"
        );
    }
    let bdir = env.backups_dir().join(&id);
    let stored = du(&bdir);
    assert!(
        stored < pgdata_bytes + (1 << 20),
        "backup holds {stored} bytes, PGDATA {pgdata_bytes}"
    );
    let entries = super::env::manifest_entries(&bdir.join("manifest")).unwrap();
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "loop",
        "outside_link",
        "global/base_again",
        "pg_stat_tmp/big",
    ] {
        assert!(
            !paths
                .iter()
                .any(|x| *x == p || x.starts_with(&format!("{p}/"))),
            "{p} is in the manifest"
        );
    }
    for p in [
        "pg_wal",
        "pg_wal/archive_status",
        "pg_stat_tmp",
        "pg_tblspc",
    ] {
        assert!(paths.contains(&p), "{p} is not in the manifest");
    }
    assert!(
        paths
            .iter()
            .any(|p| p.starts_with("pg_tblspc/") && p.contains("/PG_")),
        "the tablespace was not followed: {paths:?}"
    );

    pg.psql("postgres", "select pg_create_restore_point('after')");
    let want = Env::dumpall(pg);
    env.switch_and_wait(&env.pg);
    let target = env.dir.path().join("r");
    let newts = env.dir.path().join("ts-r");
    let map = format!("{}={}", ts.display(), newts.display());
    ok(
        walnut(&[
            "restore",
            "-B",
            env.cat(),
            "--instance",
            "db",
            "-D",
            target.to_str().unwrap(),
            "-i",
            &id,
            "--recovery-target-name",
            "after",
            "--recovery-target-action",
            "pause",
            "-T",
            &map,
        ]),
        "restore",
    );
    for p in ["loop", "outside_link", "global/base_again"] {
        assert!(
            std::fs::symlink_metadata(target.join(p)).is_err(),
            "{p} was restored"
        );
    }
    for p in ["pg_wal", "pg_stat_tmp"] {
        let md = std::fs::symlink_metadata(target.join(p)).unwrap();
        assert!(md.is_dir(), "{p} is not a directory in the restore");
    }
    assert!(std::fs::read_dir(target.join("pg_stat_tmp"))
        .unwrap()
        .next()
        .is_none());
    let sock = pg_mkdir(&env.dir.path().join("r-sock"));
    let mut r = Pg::existing(&pg_bin(), &target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_paused(&r);
    let got = Env::dumpall(&r).replace(&newts.display().to_string(), &ts.display().to_string());
    r.stop();
    assert!(got == want, "the restored cluster's dump differs");
}

/// Writes `lsn` into the `pd_lsn` of block `blk` of a relation file (server stopped).
fn set_page_lsn(path: &Path, blk: u64, lsn: u64, damage_header: bool) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut hdr = [0u8; 24];
    f.read_exact_at(&mut hdr, blk * 8192).unwrap();
    hdr[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
    hdr[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
    if damage_header {
        // pd_lower above pd_upper: an invalid header
        hdr[12..14].copy_from_slice(&9000u16.to_le_bytes());
    }
    f.write_all_at(&hdr, blk * 8192).unwrap();
    f.sync_all().unwrap();
}

/// A page whose LSN lies beyond anything the server has written (cluster without data
/// checksums, so only the LSN can tell): FULL and DELTA backups fail naming the file and
/// block, whether the rest of the header is damaged or intact; the failed backups are ERROR
/// and keep no data in the catalog.
#[test]
fn page_lsn_beyond_the_server_fails_the_backup() {
    let mut env = Env::with("tk-future-lsn", &[], "autovacuum = off");
    env.pg.psql(
        "postgres",
        "create table c(i int, t text); insert into c select g, md5(g::text) from generate_series(1, 3000) g",
    );
    let full = env.backup1("full");
    let rel = env.pg.psql("postgres", "select pg_relation_filepath('c')");
    env.pg.stop();
    let path = env.pg.data.join(&rel);
    assert!(std::fs::metadata(&path).unwrap().len() >= 4 * 8192);
    // the issue's page: garbage header, LSN far beyond the server's
    set_page_lsn(&path, 2, 0x7E_0000_0000, true);
    env.pg.start();
    let e = fails_with(
        env.backup1_cmd("full"),
        "FULL with a damaged page of a future LSN",
        &[&format!("file \"{rel}\" block 2"), "7E/0", "beyond"],
    );
    assert!(e.lines().count() <= 3, "{e}");

    // an intact header with only pd_lsn damaged, newer still: DELTA reads it too
    env.pg.stop();
    set_page_lsn(&path, 1, 0x7F_0000_0010, false);
    env.pg.start();
    fails_with(
        env.backup1_cmd("delta"),
        "DELTA with a page of a future LSN",
        &[&format!("file \"{rel}\" block 1"), "7F/10", "beyond"],
    );
    fails_with(
        env.backup1_cmd("full"),
        "FULL with a page of a future LSN",
        &[&format!("file \"{rel}\" block 1"), "7F/10"],
    );
    let rows = env.show();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        if id == full {
            assert_eq!(r["status"], "OK");
            continue;
        }
        assert_eq!(r["status"], "ERROR", "{r}");
        assert!(r["error"].as_str().unwrap().contains("beyond"), "{r}");
        // a failed backup is its started marker, its files so far and a dated ERROR
        // record: never a backup.json (nothing is rewritten or deleted)
        let left = listing(&env.backups_dir().join(id));
        assert!(
            left.contains(&"backup.started".to_string()),
            "backup {id}: {left:?}"
        );
        assert!(
            left.contains(&"status".to_string()),
            "backup {id}: {left:?}"
        );
        assert!(
            !left.contains(&"backup.json".to_string()),
            "backup {id}: {left:?}"
        );
    }
}
