//! Partial restore with a forged `databases.json` in the catalog (issue 13 hardening): the
//! map is untrusted input like the manifest. Garbage, names that look like paths or carry
//! control characters, repeated and wrong OIDs: each is refused before any write with a
//! one-line error naming the file, and nothing outside the restore target changes. A name
//! that looks like a path but stands beside a real user database's OID is only a name.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::env::*;
use super::harness::*;

/// Every path below `root` with its content (empty for directories).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            out.insert(p, Vec::new());
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

fn files_below(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    snapshot(dir)
        .into_iter()
        .filter(|(p, _)| p.is_file())
        .count()
}

#[test]
fn forged_database_map_is_refused_before_any_write() {
    let env = Env::new("rparth");
    for db in ["a", "b"] {
        env.pg.psql("postgres", &format!("create database {db}"));
        env.pg.psql(
            db,
            &format!("create table t as select generate_series(1, 1000) i, '{db}' d"),
        );
    }
    let oid = |db: &str| -> u32 {
        env.pg
            .psql(
                "postgres",
                &format!("select oid from pg_database where datname = '{db}'"),
            )
            .parse()
            .unwrap()
    };
    let (oid_a, oid_b, oid_pg) = (oid("a"), oid("b"), oid("postgres"));
    let id = env.backup1("full");
    env.switch_and_wait(&env.pg);
    let map = env.backup_dir(&id).join("databases.json");
    assert!(map.is_file(), "the backup has no databases.json");

    // sentinels beside the targets and the catalog
    let outside = env.path("outside");
    std::fs::create_dir_all(outside.join("dir")).unwrap();
    std::fs::write(outside.join("sentinel"), b"do not touch\n").unwrap();
    chown_pg(&outside);

    let db = |oid: u32, name: &str| serde_json::json!({ "oid": oid, "name": name });
    let system = vec![
        db(1, "template1"),
        db(4, "template0"),
        db(oid_pg, "postgres"),
    ];
    let with = |extra: Vec<serde_json::Value>| -> Vec<u8> {
        let mut dbs = system.clone();
        dbs.extend(extra);
        serde_json::to_vec(&serde_json::json!({ "format": 1, "databases": dbs })).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, Vec<&str>, &str)> = vec![
        (
            "garbage",
            b"\x00\xffnot json at all {".to_vec(),
            vec!["--db-include", "a"],
            "",
        ),
        (
            "unknown format",
            br#"{"format": 7, "databases": []}"#.to_vec(),
            vec!["--db-include", "a"],
            "unknown format",
        ),
        (
            "control characters in a path-like name",
            with(vec![db(oid_a, "a"), db(oid_b, "../../outside\nsentinel")]),
            vec!["--db-include", "a"],
            "invalid or repeated database",
        ),
        (
            "repeated oid",
            with(vec![db(oid_a, "a"), db(oid_a, "b")]),
            vec!["--db-include", "a"],
            "invalid or repeated database",
        ),
        (
            "path-like name with an oid the backup has no directory for",
            with(vec![db(oid_a, "a"), db(99_999, "../../../outside")]),
            vec!["--db-exclude", "../../../outside"],
            "no directory of a database 99999",
        ),
        (
            "a user database named with a system database's oid",
            // postgres moved aside; "b" claims its directory: excluding "b" would zero it
            serde_json::to_vec(&serde_json::json!({ "format": 1, "databases": [
                db(1, "template1"), db(4, "template0"), db(77_777, "postgres"),
                db(oid_a, "a"), db(oid_pg, "b"),
            ]}))
            .unwrap(),
            vec!["--db-include", "a"],
            "below 16384",
        ),
    ];
    let good = std::fs::read(&map).unwrap();
    for (i, (case, bytes, args, needle)) in cases.iter().enumerate() {
        std::fs::write(&map, bytes).unwrap();
        chown_pg(&map);
        let before = snapshot(&outside);
        let target = env.path(&format!("t{i}"));
        let mut a = vec!["-i", id.as_str()];
        a.extend(args.iter().copied());
        let e = fails_with(
            env.restore_cmd(&target, &a),
            case,
            &["databases.json", map.to_str().unwrap(), needle],
        );
        let errors: Vec<&str> = e.lines().filter(|l| !l.starts_with('[')).collect();
        assert_eq!(errors.len(), 1, "{case}: not a one-line error:\n{e}");
        assert_eq!(files_below(&target), 0, "{case}: files written:\n{e}");
        // the plan refuses the same way and writes nothing either
        let mut p = a.clone();
        p.push("--plan");
        let out = env.restore_cmd(&target, &p);
        assert!(!out.status.success(), "{case}: --plan exited 0");
        assert_eq!(files_below(&target), 0, "{case}: --plan wrote files");
        assert!(snapshot(&outside) == before, "{case}: outside changed");
    }

    // a path-like name beside a real user database's OID is only a name: that database
    // is excluded (sparse zero files inside the target), nothing outside is touched
    std::fs::write(&map, with(vec![db(oid_a, "a"), db(oid_b, "../../outside")])).unwrap();
    chown_pg(&map);
    let before = snapshot(&outside);
    let mut r = env.restore_and_start("ok", &["-i", &id, "--db-exclude", "../../outside"], false);
    wait_promoted(&r);
    assert_eq!(r.psql("a", "select count(*) from t"), "1000");
    r.psql("postgres", "drop database b");
    r.stop();
    assert!(snapshot(&outside) == before, "outside changed");
    std::fs::write(&map, good).unwrap();
}
