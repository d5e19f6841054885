//! A forged or hostile `merged.json` (the merge record of a merged FULL backup, which makes
//! listings hide the backups it replaces and makes `delete` and `merge` remove them) planted
//! in a real catalog of a real PostgreSQL 15 cluster: path traversal, absolute paths, ids
//! of backups that do not match it, garbage, an oversized record, an unknown format and a
//! symlink out of the catalog. `delete` and `merge` must refuse with a one-line error that
//! names the file, remove nothing, and touch nothing outside the catalog.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::env::{stderr, Env};
use super::harness::*;

/// Per path: kind and content (or link target), lock files and temp dirs left out.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (char, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if p != root && name.as_deref().is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        let entry = if md.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            ('l', t.into_os_string().into_encoded_bytes())
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ('d', Vec::new())
        } else {
            ('f', std::fs::read(&p).unwrap())
        };
        out.insert(p, entry);
    }
    out
}

fn record(target: &str, replaces: &[&str], chain: &[&str]) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "format": 1, "target": target, "replaces": replaces, "chain": chain,
        "time": "2026-11-30 00:00:00+00"
    }))
    .unwrap()
}

#[test]
fn lifecycle_hostile_merge_record_is_refused_and_nothing_outside_changes() {
    let mut env = Env::new("cat-hard-merge");
    env.pg.psql(
        "postgres",
        "create table t(i int); insert into t select generate_series(1, 1000)",
    );
    let f = env.backup1("full");
    env.pg
        .psql("postgres", "insert into t select generate_series(1, 500)");
    let p = env.backup1("page");
    env.pg
        .psql("postgres", "insert into t select generate_series(1, 500)");
    let f2 = env.backup1("full");
    env.pg.stop();

    // outside the catalog: sentinels, and a directory that looks like a backup
    let outside = env.path("outside");
    let victim = outside.join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::copy(
        env.backup_dir(&p).join("backup.json"),
        victim.join("backup.json"),
    )
    .unwrap();
    std::fs::write(outside.join("sentinel"), b"do not touch\n").unwrap();
    std::fs::write(outside.join("forged.json"), record(&p, &[&p], &[&p, &f])).unwrap();
    chown_pg(&outside);
    let rel_victim = "../../../../outside/victim";

    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "traversal",
            Some(record(rel_victim, &[rel_victim], &[rel_victim])),
        ),
        (
            "traversal in replaces",
            Some(record(&p, &[&p, rel_victim], &[&p, &f])),
        ),
        ("absolute path", Some(record("/etc", &["/etc"], &["/etc"]))),
        // F2 (a FULL taken after P) claims to replace P: P's start is not F2's
        ("wrong target", Some(record(&p, &[&p], &[&p, &f]))),
        ("garbage", Some(b"\x00\xffnot a merge record {\n".to_vec())),
        ("oversized", Some(vec![b' '; 2 << 20])),
        (
            "unknown format",
            Some(
                serde_json::to_vec(&serde_json::json!({
                    "format": 99, "target": p, "replaces": [p], "chain": [p], "time": ""
                }))
                .unwrap(),
            ),
        ),
        ("symlink out of the catalog", None),
    ];
    let planted = env.backup_dir(&f2).join("merged.json");
    for (case, data) in cases {
        match &data {
            Some(d) => std::fs::write(&planted, d).unwrap(),
            None => std::os::unix::fs::symlink(outside.join("forged.json"), &planted).unwrap(),
        }
        let _ = std::process::Command::new("chown")
            .args(["-h", "postgres:", planted.to_str().unwrap()])
            .status();
        let outside_before = snapshot(&outside);
        let cat_before = snapshot(&env.cat);
        let runs = [
            (
                "delete",
                env.cmd(
                    "delete",
                    &["--expired", "--retention-redundancy", "1", "--delete-wal"],
                ),
            ),
            ("delete -i", env.cmd("delete", &["-i", &f])),
            ("merge", env.cmd("merge", &["-i", &p])),
        ];
        for (cmd, out) in runs {
            let e = stderr(&out);
            assert!(!out.status.success(), "{case}: {cmd} succeeded:\n{e}");
            let errors: Vec<&str> = e
                .lines()
                .filter(|l| l.starts_with("walnut: error:"))
                .collect();
            assert_eq!(errors.len(), 1, "{case}: {cmd}: one error line:\n{e}");
            assert!(
                errors[0].contains(planted.to_str().unwrap()),
                "{case}: {cmd}: the error names {}:\n{e}",
                planted.display()
            );
            assert!(
                snapshot(&outside) == outside_before,
                "{case}: {cmd} changed something outside the catalog"
            );
            assert!(
                snapshot(&env.cat) == cat_before,
                "{case}: {cmd} changed the catalog although it refused"
            );
        }
        std::fs::remove_file(&planted).unwrap();
    }
    // ids of no backup: such a record is what a finished merge leaves (its target gone),
    // so it is accepted, and it hides and removes nothing
    std::fs::write(
        &planted,
        record("NOSUCH", &["NOSUCH", "NOTHER"], &["NOSUCH"]),
    )
    .unwrap();
    chown_pg(&planted);
    let cat_before = snapshot(&env.cat);
    let out = env.cmd("delete", &["--expired", "--retention-redundancy", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        snapshot(&env.cat) == cat_before,
        "a delete of nothing changed the catalog"
    );
    std::fs::remove_file(&planted).unwrap();
    // the catalog as it was: every backup valid, nothing hidden
    let v = env.validate(&[]);
    assert!(v.status.success(), "{}", stderr(&v));
    for id in [&f, &p, &f2] {
        assert_eq!(env.status(id), "OK", "backup {id}");
    }
}
