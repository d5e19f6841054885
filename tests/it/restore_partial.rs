//! Partial restore (issue 13): `--db-include` / `--db-exclude` by name; the system
//! databases always come back (also a `postgres` recreated under a new OID); excluded
//! databases are sparse zero files that can be dropped after recovery.
use super::env::*;

#[test]
fn partial_restore_by_database_name() {
    let env = Env::new("rpart");
    // postgres recreated: a new OID, still a system database by name
    env.pg.psql("template1", "drop database postgres");
    env.pg.psql("template1", "create database postgres");
    let pg_oid = env.pg.psql(
        "template1",
        "select oid from pg_database where datname = 'postgres'",
    );
    assert!(pg_oid.parse::<u32>().unwrap() > 16383, "{pg_oid}");
    env.pg.psql(
        "postgres",
        "create table keep as select generate_series(1, 10) i",
    );
    for db in ["a", "b", "c"] {
        env.pg.psql("postgres", &format!("create database {db}"));
        env.pg.psql(
            db,
            &format!("create table t as select generate_series(1, 5000) i, '{db}' d"),
        );
    }
    let oid = |db: &str| {
        env.pg.psql(
            "postgres",
            &format!("select oid from pg_database where datname = '{db}'"),
        )
    };
    let (oid_a, oid_b) = (oid("a"), oid("b"));
    let id = env.backup1("full");
    env.switch_and_wait(&env.pg);

    // unknown names and system databases are refused before any write
    let t = env.path("never");
    fails_with(
        env.restore_cmd(&t, &["--db-include", "nope"]),
        "unknown db",
        &["\"nope\"", "not in backup"],
    );
    fails_with(
        env.restore_cmd(&t, &["--db-exclude", "template1"]),
        "system db",
        &["always restored"],
    );
    assert!(!t.exists(), "a refused restore created the target");

    let mut r = env.restore_and_start("part", &["-i", &id, "--db-include", "a"], false);
    wait_promoted(&r);
    assert_eq!(r.psql("a", "select count(*) from t where d = 'a'"), "5000");
    assert_eq!(r.psql("postgres", "select count(*) from keep"), "10");
    // the excluded databases' files are zero-filled holes of their original size
    let tdir = env.path("part");
    let rel_b = env.pg.psql("b", "select pg_relation_filepath('t')");
    let src_len = std::fs::metadata(env.pg.data.join(&rel_b)).unwrap().len();
    let got = std::fs::read(tdir.join(&rel_b)).unwrap();
    assert!(got.len() as u64 >= src_len && got.iter().all(|&b| b == 0));
    assert!(tdir.join(format!("base/{oid_b}")).is_dir());
    assert!(tdir.join(format!("base/{oid_a}")).is_dir());
    // ... and are dropped after recovery
    r.psql("postgres", "drop database b");
    r.psql("postgres", "drop database c");
    assert_eq!(
        r.psql(
            "postgres",
            "select string_agg(datname, ',' order by datname) from pg_database"
        ),
        "a,postgres,template0,template1"
    );
    r.stop();

    // --db-exclude: the others are whole
    let mut r = env.restore_and_start("part2", &["-i", &id, "--db-exclude", "a"], false);
    wait_promoted(&r);
    assert_eq!(r.psql("b", "select count(*) from t"), "5000");
    assert_eq!(r.psql("c", "select count(*) from t"), "5000");
    r.psql("postgres", "drop database a");
    r.stop();
}
