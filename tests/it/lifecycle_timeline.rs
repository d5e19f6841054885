//! Retention across a timeline switch, against real PostgreSQL 15: a restored copy is
//! promoted and archives timeline 2 into the same instance; `delete --expired
//! --delete-wal` (redundancy 2, then also WAL depth 1) keeps backups on both timelines
//! restorable, to their restore points and through the switch to "latest".
use super::env::*;
use super::harness::*;
use super::lifecycle_util::*;

#[test]
fn retention_across_a_promoted_copy_keeps_both_timelines_restorable() {
    let mut env = Env::new("life-tli");
    let cat = env.cat.clone();
    let c = cat.to_str().unwrap().to_string();
    let pg = &env.pg;
    pg.psql(
        "postgres",
        "create table t(i int primary key, pad text); insert into t select g, md5(g::text) from generate_series(1, 2000) g",
    );
    env.switch_and_wait(pg);
    let f0 = env.backup("full", &[]);
    pg.psql("postgres", "update t set pad = 'a' where i % 3 = 0");
    env.switch_and_wait(pg);
    let f1 = env.backup("full", &[]);
    pg.psql(
        "postgres",
        &format!("select pg_create_restore_point('rp_{f1}')"),
    );
    let dump_f1 = Env::dumpall(pg);
    pg.psql("postgres", "update t set pad = 'b' where i % 3 = 1");
    env.switch_and_wait(pg);
    let p1 = env.backup("page", &[]);
    pg.psql(
        "postgres",
        &format!("select pg_create_restore_point('rp_{p1}')"),
    );
    let dump_p1 = Env::dumpall(pg);
    env.switch_and_wait(pg);
    // work on timeline 1 that the promoted copy will not have
    pg.psql("postgres", "insert into t values (-1, 'lost')");
    env.switch_and_wait(pg);
    env.pg.stop();

    // the copy: P1 to its restore point, promoted, archiving into the same instance
    let mut r = env.restore_and_start(
        "tl2",
        &[
            "-i",
            &p1,
            "--recovery-target-name",
            &format!("rp_{p1}"),
            "--recovery-target-action",
            "promote",
        ],
        true,
    );
    wait_promoted(&r);
    assert_eq!(
        r.psql(
            "postgres",
            "select timeline_id from pg_control_checkpoint()"
        ),
        "2"
    );
    r.psql("postgres", "update t set pad = 'c' where i % 3 = 2");
    switch_and_wait_in_catalog(&r, &cat);
    let f2 = ok(
        walnut(
            &env.backup_args_on(&r, "full", &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        "FULL on timeline 2",
    )
    .trim()
    .to_string();
    r.psql(
        "postgres",
        &format!("select pg_create_restore_point('rp_{f2}')"),
    );
    let dump_f2 = Env::dumpall(&r);
    r.psql("postgres", "delete from t where i % 10 = 0");
    switch_and_wait_in_catalog(&r, &cat);
    let p2 = ok(
        walnut(
            &env.backup_args_on(&r, "page", &[])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        ),
        "PAGE on timeline 2",
    )
    .trim()
    .to_string();
    r.psql("postgres", "insert into t values (-2, 'tl2')");
    let latest = Env::dumpall(&r);
    switch_and_wait_in_catalog(&r, &cat);
    r.stop();
    assert_eq!(env.row(&f2)["timeline"], 2);
    assert_eq!(env.row(&p2)["parent_id"], f2.as_str());

    // redundancy 2: F0 and the timeline-1 WAL before F1 go; both timelines stay whole
    let del = |extra: &[&str]| {
        let mut a = vec![
            "delete",
            "-B",
            &c,
            "--instance",
            "db",
            "--expired",
            "--delete-wal",
            "--retention-redundancy",
            "2",
            "--format",
            "json",
        ];
        a.extend_from_slice(extra);
        json(walnut(&a), "delete")
    };
    let rep = del(&[]);
    assert_eq!(rep["deleted"], serde_json::json!([f0]), "{rep}");
    assert!(!rep["wal"].as_array().unwrap().is_empty(), "{rep}");
    let ids: Vec<String> = statuses(&cat).into_iter().map(|(i, _)| i).collect();
    assert_eq!(ids, [f1.clone(), p1.clone(), f2.clone(), p2.clone()]);
    assert!(cat.join("instances/db/wal/00000002").exists());
    same_dump(
        &restore_dump(&env, &cat, &f1, &format!("rp_{f1}"), "a1"),
        &dump_f1,
        "F1 (timeline 1) to its restore point",
    );
    same_dump(
        &restore_dump(&env, &cat, &f1, "latest", "a2"),
        &latest,
        "F1 through the switch to latest on timeline 2",
    );
    same_dump(
        &restore_dump(&env, &cat, &f2, &format!("rp_{f2}"), "a3"),
        &dump_f2,
        "F2 (timeline 2) to its restore point",
    );

    // WAL depth 1: only P2 keeps point-in-time recovery; the others their own ranges
    let rep = del(&["--wal-depth", "1"]);
    assert_eq!(rep["deleted"].as_array().unwrap().len(), 0, "{rep}");
    assert!(!rep["wal"].as_array().unwrap().is_empty(), "{rep}");
    // the history of timeline 2 stays (P2 descends through it)
    let tl2: Vec<String> = std::fs::read_dir(cat.join("instances/db/wal/00000002"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        tl2.iter().any(|n| n.starts_with("00000002.history")),
        "{tl2:?}"
    );
    same_dump(
        &restore_dump(&env, &cat, &p1, "immediate", "b1"),
        &dump_p1,
        "P1 (timeline 1) to its consistency point",
    );
    same_dump(
        &restore_dump(&env, &cat, &f2, "immediate", "b2"),
        &dump_f2,
        "F2 (timeline 2) to its consistency point",
    );
    same_dump(
        &restore_dump(&env, &cat, &p2, "latest", "b3"),
        &latest,
        "P2 to latest",
    );
    ok(
        walnut(&["validate", "-B", &c, "--instance", "db"]),
        "validate",
    );
}
