//! `walnut merge` and `delete --merge-expired` against real PostgreSQL 15: the merged FULL
//! restores identically (pg_dumpall, pg_checksums, amcheck), replaces its chain, and a
//! child of the merged backup still restores; a SIGKILL at any catalog write or delete of
//! a merge leaves every backup listed OK restorable, and a later command finishes the job.
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use super::backup::{amcheck_all, pg_checksums_ok};
use super::env::*;
use super::harness::*;
use super::lifecycle_util::merge;

fn json(out: std::process::Output, what: &str) -> serde_json::Value {
    serde_json::from_str(&ok(out, what)).expect(what)
}

fn show(cat: &str) -> Vec<serde_json::Value> {
    json(
        walnut(&["show", "-B", cat, "--instance", "db", "--format", "json"]),
        "show",
    )
    .as_array()
    .unwrap()
    .clone()
}

/// (id, mode, status, parent) of every listed backup.
fn rows(cat: &str) -> Vec<(String, String, String, Option<String>)> {
    show(cat)
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["mode"].as_str().unwrap().to_string(),
                b["status"].as_str().unwrap().to_string(),
                b["parent_id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// Restores backup `id` of catalog `cat` to restore point `rp` (paused there) and
/// returns the running server.
fn restore_at(env: &Env, cat: &str, id: &str, rp: &str, name: &str) -> Pg {
    let target = env.path(name);
    ok(
        walnut(&[
            "restore",
            "-B",
            cat,
            "--instance",
            "db",
            "-D",
            target.to_str().unwrap(),
            "-j",
            "2",
            "-i",
            id,
            "--recovery-target-name",
            rp,
            "--recovery-target-action",
            "pause",
        ]),
        &format!("restore {id} to {rp}"),
    );
    let sock = pg_mkdir(&env.path(&format!("{name}-sock")));
    let mut r = env.pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_paused(&r);
    r
}

fn mark(pg: &Pg, rp: &str) -> String {
    let d = Env::dumpall(pg);
    pg.psql(
        "postgres",
        &format!("select pg_create_restore_point('{rp}')"),
    );
    d
}

/// FULL (LZ4) + PAGE + PAGE (LZ4) + STREAM PAGE (LZ4) with pgbench between, and a PAGE on
/// top; merging the third PAGE gives one FULL that replaces the chain: restored to its
/// restore point, pg_dumpall is the primary's there, pg_checksums and amcheck are clean;
/// the child PAGE now descends from it and restores too; validate is clean. Then
/// `delete --expired --merge-expired` merges the (pinned) child with its expired FULL.
#[test]
fn merged_full_restores_identically_and_replaces_its_chain() {
    let env = Env::new("life-merge");
    let pg = &env.pg;
    let cat = env.cat();
    pg.psql("postgres", "create extension amcheck");
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let f = env.backup("full", &["--compress", "lz4"]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    let p1 = env.backup("page", &[]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql(
        "postgres",
        "create table tt(i int primary key, pad text); insert into tt select g, md5(g::text) from generate_series(1, 20000) g; \
         delete from pgbench_history where aid % 3 = 0",
    );
    pg.psql("postgres", "vacuum pgbench_history");
    let p2 = env.backup("page", &["--compress", "lz4"]);
    pg.pgbench(&["-t", "300", "-n", "postgres"]);
    pg.psql(
        "postgres",
        "truncate tt; insert into tt select g, 'x' from generate_series(1, 500) g",
    );
    let p3 = env.backup("page", &["--compress", "lz4", "--stream"]);
    let dump3 = mark(pg, "after_p3");
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let c = env.backup("page", &[]);
    let dump_c = mark(pg, "after_c");
    env.switch_and_wait(pg);

    // refusals first: a FULL has nothing to merge; an unknown id is not found
    fails_with(
        merge(cat, &f),
        "merge of a FULL",
        &["FULL", "nothing to merge"],
    );
    fails_with(merge(cat, "NOPE"), "merge of an unknown id", &["NOPE"]);

    let r = json(merge(cat, &p3), "merge");
    let m = r["merged_id"].as_str().unwrap().to_string();
    let replaced: Vec<&str> = r["plan"]["replaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(replaced, [p3.as_str(), &p2, &p1, &f]);
    // the files no PAGE changed (most of the system catalogs) and those the newest PAGE
    // holds whole are linked from the old chain, not rewritten
    let (files, linked) = (
        r["files"].as_u64().unwrap(),
        r["linked_files"].as_u64().unwrap(),
    );
    assert!(
        linked > 0 && linked < files,
        "{linked} of {files} files linked: {r}"
    );
    assert!(
        r["linked_bytes"].as_u64().unwrap() < r["bytes_written"].as_u64().unwrap(),
        "{r}"
    );
    // the merged FULL is the only backup left of that chain; the child descends from it
    let listed = rows(cat);
    assert_eq!(
        listed,
        vec![
            (m.clone(), "FULL".into(), "OK".into(), None),
            (c.clone(), "PAGE".into(), "OK".into(), Some(m.clone())),
        ]
    );
    for id in [&f, &p1, &p2, &p3] {
        assert_eq!(count_objects(&env.backup_dir(id)), 0, "{id} still on disk");
    }
    let row = env.row(&m);
    assert_eq!(
        row["stream"], true,
        "the merged FULL carries the STREAM WAL: {row}"
    );
    // a normal FULL: whole files only, LZ4 frames manifest, no incremental file
    let entries = manifest_entries(&env.backup_dir(&m).join("manifest")).unwrap();
    assert!(entries
        .iter()
        .all(|e| e.storage != walnut::format::manifest::Storage::Incremental));
    assert!(entries.iter().any(|e| e.path.starts_with("pg_wal/")));
    ok(env.validate(&[]), "validate after merge");

    let mut r3 = restore_at(&env, cat, &m, "after_p3", "r-merged");
    same_dump(&Env::dumpall(&r3), &dump3, "merged FULL at after_p3");
    amcheck_all(&r3, &["postgres"]);
    r3.stop();
    pg_checksums_ok(&r3);
    drop(r3);
    let mut rc = restore_at(&env, cat, &c, "after_c", "r-child");
    same_dump(
        &Env::dumpall(&rc),
        &dump_c,
        "child of the merged FULL at after_c",
    );
    rc.stop();
    drop(rc);

    // --merge-expired: a new FULL expires M under redundancy 1, but C is pinned; instead
    // of keeping M as C's ancestor, C and M are merged into one FULL
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    let f2 = env.backup("full", &[]);
    ok(
        walnut(&[
            "set-backup",
            "-B",
            cat,
            "--instance",
            "db",
            "-i",
            &c,
            "--ttl",
            "1d",
        ]),
        "pin the child",
    );
    let del = |dry: bool| {
        let mut a = vec![
            "delete",
            "-B",
            cat,
            "--instance",
            "db",
            "--expired",
            "--merge-expired",
            "--retention-redundancy",
            "1",
            "--format",
            "json",
        ];
        if dry {
            a.push("--dry-run");
        }
        json(walnut(&a), "delete --merge-expired")
    };
    let before = rows(cat);
    let dry = del(true);
    assert_eq!(rows(cat), before, "a dry run changes nothing");
    assert!(dry["merged"][0]["merged_id"].is_null(), "{dry}");
    assert_eq!(
        dry["merged"][0]["plan"]["replaces"],
        serde_json::json!([c, m])
    );
    let mdec = dry["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == m.as_str())
        .unwrap()
        .clone();
    assert_eq!(mdec["keep"], false, "{mdec}");
    assert!(
        mdec["reason"].as_str().unwrap().contains("merged into"),
        "{mdec}"
    );
    assert_eq!(dry["deleted"].as_array().unwrap().len(), 0, "{dry}");
    let real = del(false);
    let m2 = real["merged"][0]["merged_id"].as_str().unwrap().to_string();
    let listed = rows(cat);
    assert_eq!(
        listed,
        vec![
            (m2.clone(), "FULL".into(), "OK".into(), None),
            (f2.clone(), "FULL".into(), "OK".into(), None),
        ]
    );
    assert!(
        env.row(&m2)["expire_time"].is_string(),
        "the pin goes with the merge"
    );
    let mut rc2 = restore_at(&env, cat, &m2, "after_c", "r-merged2");
    same_dump(&Env::dumpall(&rc2), &dump_c, "C merged with M at after_c");
    rc2.stop();
}

/// Objects below `dir` (recursively), lock files left out.
fn count_objects(dir: &Path) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            n += count_objects(&p);
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            n += 1;
        }
    }
    n
}

fn copy_catalog(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

/// A SIGKILL right before each of many catalog writes and deletes of a merge (before,
/// around and after the switch): every backup then listed OK validates, the child of the
/// merged backup restores to its restore point, nothing half-written reads OK, and a
/// later `merge` (or `delete`, then `merge`) finishes: the merged FULL and the child, and
/// no leftover.
#[test]
fn merge_killed_at_any_point_is_finished_by_the_next_command() {
    let env = Env::new("life-merge-kill");
    let pg = &env.pg;
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let f = env.backup("full", &[]);
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let p1 = env.backup("page", &["--compress", "lz4"]);
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let p2 = env.backup("page", &[]);
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    let c = env.backup("delta", &[]);
    let dump_c = mark(pg, "after_c");
    env.switch_and_wait(pg);
    let pristine = env.path("pristine");
    copy_catalog(&env.cat, &pristine);

    // how many writes and deletes a whole merge makes
    let work = env.path("work");
    let w = work.to_str().unwrap().to_string();
    copy_catalog(&pristine, &work);
    let old_objects: usize = [&f, &p1, &p2]
        .iter()
        .map(|id| count_objects(&work.join("instances/db/backups").join(id)))
        .sum();
    let r = json(merge(&w, &p2), "uninterrupted merge");
    let m = r["merged_id"].as_str().unwrap().to_string();
    let writes = count_objects(&work.join("instances/db/backups").join(&m));
    // writes of the new backup; then per replaced backup an ERROR record, and its objects
    // (with that record) deleted
    let total = writes + 3 + old_objects + 3;
    let switch = writes; // backup.json is the merged backup's last write
    let mut points: Vec<usize> = vec![1, 2, 3, 4, switch - 2, switch - 1, switch, switch + 1];
    points.extend([
        switch + 2,
        switch + 3,
        switch + 4,
        switch + 5,
        total - 1,
        total,
    ]);
    for k in 1..=12 {
        points.push(k * total / 13);
    }
    points.sort_unstable();
    points.dedup();
    assert!(points.len() >= 20, "{points:?}");
    eprintln!("merge makes {total} writes and deletes (switch at {switch}); killing at {points:?}");

    let bdir = work.join("instances/db/backups");
    for (i, n) in points.iter().enumerate() {
        copy_catalog(&pristine, &work);
        let out = run(as_pg(walnut_bin("walnut"))
            .args(["merge", "-B", &w, "--instance", "db", "-i", &p2])
            .env("WALNUT_TEST_KILL_AT", n.to_string()));
        if *n + 2 < total {
            // runuser reports its child's SIGKILL as 128 + 9
            assert!(
                out.status.signal() == Some(9) || out.status.code() == Some(137),
                "kill at {n}: merge should have been killed ({})\n{}",
                out.status,
                stderr(&out)
            );
        }
        // what is listed OK: the old chain, or the merged FULL, and the child
        let listed = rows(&w);
        for (id, mode, status, _) in &listed {
            assert!(
                status == "OK" || status == "ERROR",
                "kill at {n}: {id} {status}"
            );
            if status == "OK" {
                assert!(
                    [&f, &p1, &p2, &c].contains(&id) || mode == "FULL",
                    "kill at {n}: {id} {mode} listed OK"
                );
            }
        }
        let child = listed
            .iter()
            .find(|b| b.0 == c)
            .expect("the child is listed");
        assert_eq!(child.2, "OK", "kill at {n}");
        ok(
            walnut(&["validate", "-B", &w, "--instance", "db"]),
            &format!("validate after a kill at {n}"),
        );
        if i % 4 == 0 {
            let mut r = restore_at(&env, &w, &c, "after_c", &format!("r-kill-{n}"));
            same_dump(
                &Env::dumpall(&r),
                &dump_c,
                &format!("child after a kill at {n}"),
            );
            r.stop();
            drop(r);
            let _ = std::fs::remove_dir_all(env.path(&format!("r-kill-{n}")));
        }
        if i % 2 == 1 {
            // delete (keeping everything) finishes the cleanup part
            ok(
                walnut(&[
                    "delete",
                    "-B",
                    &w,
                    "--instance",
                    "db",
                    "--expired",
                    "--retention-redundancy",
                    "5",
                ]),
                &format!("delete after a kill at {n}"),
            );
            assert!(
                rows(&w).iter().all(|b| b.2 == "OK"),
                "kill at {n}: delete leaves no ERROR leftover: {:?}",
                rows(&w)
            );
        }
        let again = json(merge(&w, &p2), &format!("merge again after a kill at {n}"));
        let m = again["merged_id"].as_str().unwrap().to_string();
        let listed = rows(&w);
        assert_eq!(
            listed,
            vec![
                (m.clone(), "FULL".into(), "OK".into(), None),
                (c.clone(), "DELTA".into(), "OK".into(), Some(m.clone())),
            ],
            "kill at {n}"
        );
        let mut names: Vec<String> = std::fs::read_dir(&bdir)
            .unwrap()
            .flatten()
            .filter(|e| count_objects(&e.path()) > 0)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec![m.clone(), c.clone()];
        want.sort();
        assert_eq!(names, want, "kill at {n}: no leftover directory");
    }
    let mut r = restore_at(&env, &w, &c, "after_c", "r-final");
    same_dump(&Env::dumpall(&r), &dump_c, "child after the last re-run");
    r.stop();
}
