//! Lifecycle safety against real PostgreSQL 15: locks between delete and the commands that
//! use backups (restore, backup on a parent), and delete killed (SIGKILL) at many points.
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use super::env::*;
use super::harness::*;
use super::lifecycle_util::*;

/// A command run in the background as the cluster owner.
fn spawn_walnut(args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// A walnut command paused by `WALNUT_TEST_PAUSE_AFTER_LOCK` once it holds its locks: the
/// child, once it said so on stderr (waited for, up to 120 s: a fixed sleep is not enough
/// on a loaded machine), and a thread that collects the rest of its stderr.
fn spawn_paused(
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead;
    let mut c = spawn_walnut(args, env);
    let err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if line.contains("WALNUT_TEST_PAUSE_AFTER_LOCK: pausing") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let out = c.wait_with_output().unwrap();
        panic!(
            "{args:?} never paused with its locks held: {}\n{}",
            out.status,
            reader.join().unwrap()
        );
    }
    (c, reader)
}

/// Waits for a child of [`spawn_paused`]; its stdout, or a panic with its stderr.
fn wait_paused_child(
    (c, reader): (std::process::Child, std::thread::JoinHandle<String>),
    what: &str,
) -> String {
    let out = c.wait_with_output().unwrap();
    let err = reader.join().unwrap();
    assert!(out.status.success(), "{what} failed: {}\n{err}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A delete of a backup being restored is refused and the restore succeeds; a delete of the
/// parent of a running PAGE backup is refused (and its WAL purge skipped) and the backup
/// succeeds; afterwards the same delete goes through.
#[test]
fn delete_refuses_backups_in_use_by_a_restore_or_a_running_backup() {
    let env = Env::new("life-locks");
    let pg = &env.pg;
    let cat = env.cat();
    pg.psql(
        "postgres",
        "create table t(i int primary key, pad text); insert into t select g, md5(g::text) from generate_series(1, 5000) g",
    );
    let f1 = env.backup("full", &[]);
    pg.psql("postgres", "update t set pad = 'p' where i % 3 = 0");
    env.switch_and_wait(pg);
    let p1 = env.backup("page", &[]);
    let latest = Env::dumpall(pg);
    env.switch_and_wait(pg);

    // a restore of P1 (chain F1, P1), slowed down after it locked its chain
    let target = env.path("r1");
    let t = target.to_str().unwrap().to_string();
    let restore = spawn_paused(
        &[
            "restore",
            "-B",
            cat,
            "--instance",
            "db",
            "-D",
            &t,
            "-i",
            &p1,
        ],
        &[("WALNUT_TEST_PAUSE_AFTER_LOCK", "20"), ("RUST_LOG", "info")],
    );
    // the restore holds its chain's locks and sleeps: the deletes run meanwhile
    // (-i F1 takes P1 too; either may be named: both are in use)
    for id in [&f1, &p1] {
        fails_with(
            env.cmd("delete", &["-i", id]),
            "delete of a backup being restored",
            &["in use", "nothing deleted"],
        );
    }
    assert_eq!(env.status(&f1), "OK");
    assert_eq!(env.status(&p1), "OK");
    wait_paused_child(restore, "the restore the delete ran against");
    let sock = pg_mkdir(&env.path("r1-sock"));
    let mut r = pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    same_dump(&Env::dumpall(&r), &latest, "restore that outlived a delete");
    r.stop();

    // a PAGE backup (parent P1) slowed down after it locked its parent chain
    pg.psql("postgres", "insert into t values (100000, 'new')");
    let args = env.backup_args_on(pg, "page", &[]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let backup = spawn_paused(
        &a,
        &[("WALNUT_TEST_PAUSE_AFTER_LOCK", "20"), ("RUST_LOG", "info")],
    );
    fails_with(
        env.cmd("delete", &["-i", &p1]),
        "delete of the parent of a running PAGE backup",
        &["in use", &p1],
    );
    let running = env
        .show()
        .iter()
        .find(|b| b["status"] == "RUNNING")
        .map(|b| b["id"].as_str().unwrap().to_string())
        .unwrap();
    fails_with(
        env.cmd("delete", &["-i", &running]),
        "delete of a running backup",
        &["RUNNING"],
    );
    // the WAL purge waits for the next delete while a backup runs
    let r = json(
        env.cmd("delete", &["--delete-wal", "--format", "json"]),
        "delete --delete-wal during a backup",
    );
    assert!(
        r["wal_skipped"].as_str().unwrap_or("").contains("running"),
        "{r}"
    );
    let p2 = wait_paused_child(backup, "the PAGE backup a delete ran against")
        .trim()
        .to_string();
    assert_eq!(p2, running);
    assert_eq!(env.status(&p2), "OK");
    assert_eq!(env.row(&p2)["parent_id"], p1.as_str());

    // nothing in use now: the delete of P1 takes its descendant P2 too
    let r = json(
        env.cmd("delete", &["-i", &p1, "--format", "json"]),
        "delete -i P1",
    );
    assert_eq!(r["deleted"], serde_json::json!([p2, p1]), "{r}");
    assert_eq!(env.status(&f1), "OK");
}

/// The state a delete leaves that tests compare: the catalog's files without the status
/// and verification records that validate writes.
fn state(cat: &std::path::Path) -> BTreeSet<String> {
    files(cat)
        .into_iter()
        .filter(|f| !f.contains("/status/") && !f.contains("/verify/"))
        .collect()
}

/// `delete --expired --retention-redundancy 1 --delete-wal` of FULL, PAGE, DELTA, FULL,
/// PAGE, killed (SIGKILL) at 24 points spread over its catalog writes and deletes (the
/// "being deleted" marks, the removal of each backup, the WAL purge): after each kill no
/// backup the delete touched lists as OK, `validate` passes (every OK backup is intact),
/// at four points every OK backup restores to its restore point with the primary's
/// pg_dumpall there, and a re-run leaves exactly what an uninterrupted delete leaves.
#[test]
fn delete_killed_at_any_point_leaves_ok_backups_restorable_and_a_rerun_finishes() {
    let env = Env::new("life-crash");
    let pg = &env.pg;
    pg.psql(
        "postgres",
        "create table t(i int primary key, pad text); insert into t select g, md5(g::text) from generate_series(1, 3000) g",
    );
    env.switch_and_wait(pg);
    let mut ids = Vec::new();
    let mut dumps = BTreeMap::new();
    for (n, mode) in ["full", "page", "delta", "full", "page"].iter().enumerate() {
        pg.psql(
            "postgres",
            &format!(
                "update t set pad = '{n}' where i % 5 = {n}; insert into t values ({}, 'b')",
                10000 + n
            ),
        );
        env.switch_and_wait(pg);
        let id = env.backup(mode, &[]);
        pg.psql(
            "postgres",
            &format!("select pg_create_restore_point('rp_{id}')"),
        );
        dumps.insert(id.clone(), Env::dumpall(pg));
        env.switch_and_wait(pg);
        ids.push(id);
    }
    let kept: BTreeSet<String> = ids[3..].iter().cloned().collect();
    let pristine = env.path("pristine");
    copy_catalog(&env.cat, &pristine);
    let del = |cat: &std::path::Path, kill: Option<usize>| {
        let mut env_vars = Vec::new();
        if let Some(k) = kill {
            env_vars.push(("WALNUT_TEST_KILL_AT", k.to_string()));
        }
        let mut args = vec!["delete", "-B", cat.to_str().unwrap(), "--instance", "db"];
        args.extend_from_slice(EXPIRE_REDUNDANCY_1_JSON);
        walnut_env(&args, &env_vars)
    };
    // the uninterrupted delete, for reference
    let reference = copy_catalog(&pristine, &env.path("reference"));
    let r = json(del(&reference, None), "uninterrupted delete");
    let mut want_deleted = ids[..3].to_vec();
    want_deleted.reverse();
    assert_eq!(r["deleted"], serde_json::json!(want_deleted), "{r}");
    let want = state(&reference);
    let before = state(&pristine);
    // every write or delete is a crash point: 3 marks, then each removed object
    let total = 3 + before.difference(&want).count();
    assert!(total > 40, "{total} crash points only");
    let mut points: BTreeSet<usize> = (1..=6).collect();
    for i in 0..18 {
        points.insert(7 + i * (total - 7) / 17);
    }
    points.insert(total);
    assert!(points.len() >= 20, "{points:?}");
    let restore_at: BTreeSet<usize> = [2, 5, total / 2, total].into_iter().collect();
    let work = env.path("work");
    for &k in &points {
        copy_catalog(&pristine, &work);
        let out = del(&work, Some(k));
        // (through the wrapper that runs it as the cluster owner: exit status 128 + 9)
        assert!(
            out.status.signal() == Some(9) || out.status.code() == Some(137),
            "kill point {k} of {total}: the delete was not killed: {}",
            stderr(&out)
        );
        let st = statuses(&work);
        for (id, s) in &st {
            if s == "OK" && !kept.contains(id) {
                // only a backup the delete had not marked yet may still be OK: then it is
                // untouched, which validate below proves
                assert!(
                    k <= 3,
                    "kill point {k}: doomed backup {id} still lists as OK"
                );
            }
        }
        for id in &kept {
            assert!(
                st.contains(&(id.clone(), "OK".to_string())),
                "kill point {k}: kept backup {id} is not OK: {st:?}"
            );
        }
        ok(
            walnut(&["validate", "-B", work.to_str().unwrap(), "--instance", "db"]),
            &format!("validate after a kill at {k}"),
        );
        if restore_at.contains(&k) {
            for (id, s) in statuses(&work) {
                if s == "OK" {
                    let d =
                        restore_dump(&env, &work, &id, &format!("rp_{id}"), &format!("r{k}-{id}"));
                    same_dump(&d, &dumps[&id], &format!("kill point {k}: backup {id}"));
                }
            }
        }
        let r = json(del(&work, None), &format!("re-run after a kill at {k}"));
        assert!(r["wal_skipped"].is_null(), "{r}");
        let got = state(&work);
        assert_eq!(
            got.symmetric_difference(&want).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "kill point {k}: the re-run left a different catalog"
        );
        let ids_left: Vec<String> = statuses(&work).into_iter().map(|(i, _)| i).collect();
        assert_eq!(ids_left, ids[3..].to_vec(), "kill point {k}");
    }
    // the kept chain restores to latest from a catalog that went through a killed delete
    let d = restore_dump(&env, &work, &ids[4], "latest", "r-latest");
    same_dump(&d, &Env::dumpall(pg), "kept PAGE to latest");
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&pristine);
    let _ = std::fs::remove_dir_all(&reference);
}
