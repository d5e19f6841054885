//! The append-only catalog, on the backup side: backups, failed backups and validations
//! (CORRUPT, ORPHAN, then OK again) only ever add objects. Every file that existed before
//! is still there, unchanged (same inode, size and mtime), on a store that refuses deletes.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::env::*;
use super::harness::*;

/// `walnut ARGS` with the catalog refusing deletes (as a WORM bucket would).
fn walnut_worm(args: &[&str]) -> Output {
    let mut c = as_pg(walnut_bin("walnut"));
    c.env(walnut::catalog::REFUSE_DELETE_ENV, "1").args(args);
    run(&mut c)
}

/// Every file below `root` (dot names, the store's temps and locks, aside) with its
/// inode, size and mtime.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (md.ino(), md.len(), md.mtime(), md.mtime_nsec()));
            }
        }
    }
    out
}

#[test]
fn backups_and_validations_only_add_objects() {
    let env = Env::new("bk-append");
    let pg = &env.pg;
    pg.psql(
        "postgres",
        "create table t(i int primary key, s text); insert into t select g, 'a' from generate_series(1, 5000) g",
    );
    let full = env.backup("full", &["--compress", "lz4"]);
    pg.psql(
        "postgres",
        "insert into t select g, 'b' from generate_series(5001, 6000) g",
    );
    let page = env.backup("page", &[]);
    pg.psql("postgres", "update t set s = 'c' where i <= 100");
    let delta = env.backup("delta", &[]);
    env.switch_and_wait(pg);
    let before = snapshot(&env.cat);
    for id in [&full, &page, &delta] {
        let d = env.backup_dir(id);
        assert!(d.join("backup.started").is_file() && d.join("backup.json").is_file());
    }

    // a backup that fails after it started: its marker and an ERROR record
    let a = env.backup_args_on(pg, "page", &["--parent", "NOSUCH"]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    fails_with(walnut_worm(&a), "PAGE with a missing parent", &["NOSUCH"]);
    let failed: Vec<serde_json::Value> = env
        .show()
        .into_iter()
        .filter(|r| r["status"] == "ERROR")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0]["error"].as_str().unwrap().contains("NOSUCH"));

    // damage the FULL: CORRUPT, its descendants ORPHAN, as new records
    let rel = env.damage_stored(pg, &full, "t");
    let damaged = env.backup_dir(&full).join(format!("database/{rel}.lz4"));
    let v = env.validate(&[]);
    assert!(!v.status.success(), "validate should fail on damage");
    let v = walnut_worm(&["validate", "-B", env.cat(), "--instance", "db"]);
    assert!(!v.status.success());
    assert_eq!(env.status(&full), "CORRUPT");
    assert_eq!(env.status(&page), "ORPHAN");
    assert_eq!(env.status(&delta), "ORPHAN");
    // repaired: a clean validation restores OK, again as new records
    let mut b = std::fs::read(&damaged).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    std::fs::write(&damaged, &b).unwrap();
    ok(
        walnut_worm(&["validate", "-B", env.cat(), "--instance", "db"]),
        "validate after repair",
    );
    for id in [&full, &page, &delta] {
        assert_eq!(env.status(id), "OK", "{id}");
        let records = std::fs::read_dir(env.backup_dir(id).join("status"))
            .unwrap()
            .count();
        assert!(records >= 2, "{id}: {records} status records");
    }

    // nothing that existed was rewritten or removed (but the file this test damaged)
    let after = snapshot(&env.cat);
    for (p, v) in &before {
        if *p == damaged {
            continue;
        }
        assert_eq!(
            after.get(p),
            Some(v),
            "{} was rewritten or removed",
            p.display()
        );
    }

    // the DELTA chain restores from the WORM store
    let target = env.path("r-delta");
    let t = target.to_str().unwrap();
    ok(
        walnut_worm(&[
            "restore",
            "-B",
            env.cat(),
            "--instance",
            "db",
            "-i",
            &delta,
            "-D",
            t,
            "--recovery-target",
            "immediate",
            "--recovery-target-action",
            "promote",
        ]),
        "restore delta",
    );
    let sock = pg_mkdir(&env.path("r-delta-sock"));
    let mut r = pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    assert_eq!(r.psql("postgres", "select count(*) from t"), "6000");
    assert_eq!(
        r.psql("postgres", "select count(*) from t where s = 'c'"),
        "100"
    );
    r.stop();
}

/// A backup is RUNNING while its taker holds the running lock (here: waiting for WAL that
/// is never archived) and ERROR once the taker is killed: derived from the started marker
/// and the lock, with nothing rewritten.
#[test]
fn running_while_the_taker_lives_error_once_it_is_killed() {
    let env = Env::new("bk-running");
    let pg = &env.pg;
    pg.psql(
        "postgres",
        "create table t(i int); insert into t values (1)",
    );
    // archiving fails from now on (the command still names this catalog, as checks want)
    pg.append_conf(&format!(
        "archive_command = 'false walnut-archive -B {} --instance db %p %f'",
        env.cat()
    ));
    pg.psql("postgres", "select pg_reload_conf()");
    let args = env.backup_args_on(pg, "full", &["--archive-timeout", "120"]);
    let mut child = as_pg(walnut_bin("walnut"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(env.path("backup.err")).unwrap())
        .spawn()
        .expect("spawn backup");
    let t0 = std::time::Instant::now();
    let row = loop {
        if let Some(r) = env.show().into_iter().find(|r| r["status"] == "RUNNING") {
            break r;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no RUNNING backup in show: {:?}\n{}",
            env.show(),
            std::fs::read_to_string(env.path("backup.err")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let id = row["id"].as_str().unwrap().to_string();
    let marker = env.backup_dir(&id).join("backup.started");
    let m = walnut::backup::meta::decode(&std::fs::read(&marker).unwrap(), "marker").unwrap();
    let pid = m.pid.expect("the marker names its taker");
    // the walnut process this test started (runuser's child), by its id
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    let row = env.row(&id);
    assert_eq!(row["status"], "ERROR", "{row}");
    assert!(!env.backup_dir(&id).join("backup.json").exists());
    assert!(marker.is_file());
}
