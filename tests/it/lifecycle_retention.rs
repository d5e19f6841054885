//! Lifecycle against real PostgreSQL 15: retention settings, pins, delete (dry run, -i,
//! --expired) and the WAL purge; the kept chain still restores and validates.
use super::env::*;
use super::harness::*;
use super::lifecycle_util::{json, EXPIRE_REDUNDANCY_1_JSON};

/// FULL, PAGE, FULL; then `delete --expired --retention-redundancy 1 --delete-wal`: the
/// first chain and the WAL before the kept FULL go (indexes with their segments), the kept
/// FULL restores to latest with the primary's pg_dumpall, and `validate --wal` is clean.
#[test]
fn redundancy_one_with_wal_purge_keeps_a_restorable_chain() {
    let env = Env::new("life-ret");
    let pg = &env.pg;
    let cat = env.cat();
    pg.psql(
        "postgres",
        "create table t(i int primary key, pad text); insert into t select g, md5(g::text) from generate_series(1, 2000) g",
    );
    for _ in 0..3 {
        env.switch_and_wait(pg);
    }
    let f1 = env.backup("full", &[]);
    pg.psql("postgres", "update t set pad = upper(pad) where i % 7 = 0");
    env.switch_and_wait(pg);
    let p1 = env.backup("page", &[]);
    pg.psql(
        "postgres",
        "insert into t select g, 'x' from generate_series(2001, 3000) g",
    );
    env.switch_and_wait(pg);
    let f2 = env.backup("full", &[]);
    pg.psql("postgres", "delete from t where i % 5 = 0");
    let latest = Env::dumpall(pg);
    env.switch_and_wait(pg);

    // settings: stored, shown, overridable for one run
    ok(
        env.cmd(
            "set-config",
            &["--retention-redundancy", "2", "--wal-depth", "1"],
        ),
        "set-config",
    );
    let c = json(env.cmd("show-config", &["--format", "json"]), "show-config");
    assert_eq!(c["retention_redundancy"], 2);
    assert_eq!(c["wal_depth"], 1);
    assert!(c["retention_window"].is_null());
    ok(env.cmd("set-config", &["--wal-depth", "0"]), "unset");
    let c = json(env.cmd("show-config", &["--format", "json"]), "show-config");
    assert_eq!(c["retention_redundancy"], 2, "an unmentioned setting stays");
    assert!(c["wal_depth"].is_null(), "0 unsets");
    // the stored policy (redundancy 2) keeps everything
    let r = json(
        env.cmd("delete", &["--expired", "--format", "json"]),
        "delete with the stored policy",
    );
    assert_eq!(r["deleted"].as_array().unwrap().len(), 0);

    // a pin keeps the first chain; show displays it
    ok(
        env.cmd("set-backup", &["-i", &p1, "--ttl", "1d", "--note", "audit"]),
        "pin",
    );
    let rows = env.show();
    let row = rows.iter().find(|b| b["id"] == p1.as_str()).unwrap();
    assert!(row["expire_time"].is_string(), "{row}");
    assert_eq!(row["note"], "audit");
    let r = json(
        env.cmd(
            "delete",
            &[
                "--expired",
                "--retention-redundancy",
                "1",
                "--dry-run",
                "--format",
                "json",
            ],
        ),
        "dry run with a pin",
    );
    assert_eq!(r["deleted"].as_array().unwrap().len(), 0, "{r}");
    // -i refuses a pinned backup
    fails_with(
        env.cmd("delete", &["-i", &f1]),
        "delete a pinned chain",
        &["pinned"],
    );
    ok(env.cmd("set-backup", &["-i", &p1, "--ttl", "0"]), "unpin");
    let rows = env.show();
    assert!(rows.iter().find(|b| b["id"] == p1.as_str()).unwrap()["expire_time"].is_null());

    // dry run: the plan, nothing changed
    let wal_dir = env.cat.join("instances/db/wal/00000001");
    let count = || std::fs::read_dir(&wal_dir).unwrap().count();
    let before = count();
    let r = json(
        env.cmd("delete", &["-i", &f1, "--dry-run", "--format", "json"]),
        "dry run -i",
    );
    assert_eq!(
        r["deleted"],
        serde_json::json!([p1, f1]),
        "descendants first: {r}"
    );
    let text = ok(
        env.cmd(
            "delete",
            &[
                "--expired",
                "--retention-redundancy",
                "1",
                "--delete-wal",
                "--dry-run",
            ],
        ),
        "dry run text",
    );
    assert!(text.contains(&format!("would delete {f1}")), "{text}");
    assert!(text.contains("would delete WAL 0000000100"), "{text}");
    assert_eq!(env.show().len(), 3);
    assert_eq!(count(), before);

    // a delete killed at its first removal (a store that refuses deletes): the backups it
    // chose read as ERROR, never OK, the kept one is untouched; the re-run finishes the job
    let killed = run(as_pg(walnut_bin("walnut"))
        .args([
            "delete",
            "-B",
            cat,
            "--instance",
            "db",
            "--expired",
            "--retention-redundancy",
            "1",
            "--delete-wal",
        ])
        .env("WALNUT_TEST_REFUSE_DELETE", "1"));
    fails_with(
        killed,
        "delete on a store refusing deletes",
        &["refuses deletes"],
    );
    assert_eq!(env.status(&f1), "ERROR");
    assert_eq!(env.status(&p1), "ERROR");
    assert_eq!(env.status(&f2), "OK");
    let r = json(
        env.cmd("delete", EXPIRE_REDUNDANCY_1_JSON),
        "delete --expired --delete-wal",
    );
    assert_eq!(r["deleted"], serde_json::json!([p1, f1]), "{r}");
    let ids: Vec<String> = env
        .show()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&f2));
    assert!(count() < before, "no WAL purged: {r}");
    // nothing before the kept FULL's start segment, and no index without its segment
    let start = env.show()[0]["start_lsn"].as_str().unwrap().to_string();
    let (hi, lo) = start.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let first_seg = lsn >> 20; // 1 MiB segments
    let mut segs = std::collections::BTreeSet::new();
    let mut idx = Vec::new();
    for e in std::fs::read_dir(&wal_dir).unwrap() {
        let n = e.unwrap().file_name().into_string().unwrap();
        if n.len() >= 24 && n[..24].bytes().all(|c| c.is_ascii_hexdigit()) {
            let s = u64::from_str_radix(&n[16..24], 16).unwrap()
                + (u64::from_str_radix(&n[8..16], 16).unwrap() << 12);
            assert!(
                s >= first_seg,
                "{n} is before the kept backup's start {start}"
            );
            if n.ends_with(".idx") || n.ends_with(".idx-pending") {
                idx.push(n[..24].to_string());
            } else if n.len() == 28 && n.ends_with(".lz4") {
                segs.insert(n[..24].to_string());
            }
        }
    }
    for i in idx {
        assert!(segs.contains(&i), "index of {i} without its segment");
    }
    // a second run has nothing left to do
    let r = json(env.cmd("delete", EXPIRE_REDUNDANCY_1_JSON), "second run");
    assert_eq!(r["deleted"].as_array().unwrap().len(), 0);
    assert!(r["wal"].as_array().unwrap().is_empty(), "{r}");

    ok(env.cmd("validate", &["--wal"]), "validate --wal");
    let mut restored = env.restore_and_start("r", &["-i", &f2], false);
    wait_promoted(&restored);
    same_dump(&Env::dumpall(&restored), &latest, "kept FULL to latest");
    restored.stop();
}
