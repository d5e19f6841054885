//! Answers from the block index against a real PostgreSQL 15: the PITR window of each
//! backup (ending at a segment deleted from the archive), named restore points listed by
//! `show --archive`, `backup -b page --dry-run` within 5 % of the real backup, and churn
//! naming the table that was hammered by updates.
use serde_json::Value;

use super::env::{stderr, stdout, Env};
use super::harness::*;
use walnut::Lsn;

fn json(out: std::process::Output, what: &str) -> Value {
    serde_json::from_str(&ok(out, what)).unwrap_or_else(|e| panic!("{what}: json: {e}"))
}

fn show_archive(env: &Env, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["show", "-B", env.cat(), "--instance", "db", "--archive"];
    a.extend_from_slice(extra);
    walnut(&a)
}

/// The window runs from the backup's stop LSN to the end of the archive and covers a
/// restore point; with a segment deleted from the archive it ends before that segment
/// and names it. `show --archive` lists the restore point with its LSN and time.
#[test]
fn pitr_window_ends_at_a_gap_and_restore_points_are_listed() {
    let env = Env::new("ia-horizon");
    env.pg.psql("postgres", "create table h (a int)");
    let id = env.backup("full", &[]);
    let stop: Lsn = env.row(&id)["stop_lsn"].as_str().unwrap().parse().unwrap();
    let mut segs = Vec::new();
    let mut rp = Lsn(0);
    for i in 0..4 {
        env.pg
            .psql("postgres", &format!("insert into h values ({i})"));
        if i == 1 {
            rp = env
                .pg
                .psql("postgres", "select pg_create_restore_point('before_gap')")
                .parse()
                .unwrap();
        }
        segs.push(env.switch_and_wait(&env.pg));
    }
    let row = env.row(&id);
    let w = row["pitr"].as_array().unwrap();
    assert_eq!(w.len(), 1, "{row}");
    assert_eq!(w[0]["timeline"], 1);
    assert_eq!(w[0]["from_lsn"], stop.to_string());
    assert!(
        w[0]["ends"]
            .as_str()
            .unwrap()
            .contains("end of the archive"),
        "{}",
        w[0]
    );
    let to: Lsn = w[0]["to_lsn"].as_str().unwrap().parse().unwrap();
    assert!(to > rp, "window reaches the restore point: {to} > {rp}");
    assert!(w[0]["to_time"].is_string());

    let a = json(show_archive(&env, &["--format", "json"]), "show --archive");
    let points = a["timelines"][0]["restore_points"].as_array().unwrap();
    let p = points
        .iter()
        .find(|p| p["name"] == "before_gap")
        .expect("listed");
    // the record's start (as pg_waldump shows it); pg_create_restore_point returns its end
    let at: Lsn = p["lsn"].as_str().unwrap().parse().unwrap();
    assert!(at < rp && rp.0 - at.0 < 256, "{at} vs {rp}");
    assert!(p["time"].as_str().unwrap().starts_with("20"));
    let text = ok(show_archive(&env, &[]), "show --archive text");
    assert!(text.contains("restore point \"before_gap\""), "{text}");

    // delete the third segment after the backup: the window ends before it
    let ar = env.archive();
    std::fs::remove_file(ar.data_path(&segs[2])).unwrap();
    let row = env.row(&id);
    let w = &row["pitr"][0];
    let ends = w["ends"].as_str().unwrap();
    assert!(
        ends.contains("gap") && ends.contains(&segs[2].to_string()),
        "{w}"
    );
    let to: Lsn = w["to_lsn"].as_str().unwrap().parse().unwrap();
    let seg_start = segs[2].segno(ar.seg_size()).unwrap() * u64::from(ar.seg_size());
    assert!(to.0 <= seg_start && to > rp, "{to} ends before {}", segs[2]);
    let text = ok(
        walnut(&["show", "-B", env.cat(), "--instance", "db"]),
        "show",
    );
    assert!(
        text.contains("PITR until") && text.contains(&to.to_string()),
        "{text}"
    );
}

/// `backup -b page --dry-run` writes nothing and predicts the real PAGE backup taken right
/// after within 5 % (files and data_bytes).
#[test]
fn page_dry_run_predicts_the_real_backup_within_5_percent() {
    let env = Env::new("ia-dry");
    env.pg.pgbench(&["-i", "-q", "-s", "4", "postgres"]);
    let full = env.backup("full", &[]);
    env.pg.pgbench(&["-n", "-t", "400", "-c", "2", "postgres"]);
    env.pg.psql(
        "postgres",
        "create table fresh as select g, md5(g::text) from generate_series(1, 20000) g",
    );
    let before: Vec<_> = std::fs::read_dir(env.backups_dir()).unwrap().collect();
    let args = env.backup_args_on(&env.pg, "page", &["--dry-run", "--format", "json"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = walnut(&a);
    assert!(out.status.success(), "{}", stderr(&out));
    let d: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(d["mode"], "PAGE");
    assert_eq!(d["parent_id"], full.as_str());
    let after: Vec<_> = std::fs::read_dir(env.backups_dir()).unwrap().collect();
    assert_eq!(before.len(), after.len(), "the dry run wrote no backup");

    let id = env.backup("page", &[]);
    let row = env.row(&id);
    let (pb, rb) = (
        d["data_bytes"].as_f64().unwrap(),
        row["data_bytes"].as_f64().unwrap(),
    );
    let (pf, rf) = (d["files"].as_f64().unwrap(), row["files"].as_f64().unwrap());
    eprintln!("predicted {pb} bytes / {pf} files, real {rb} bytes / {rf} files");
    assert!(
        (pb - rb).abs() <= 0.05 * rb,
        "data_bytes: predicted {pb}, real {rb}"
    );
    assert!(
        (pf - rf).abs() <= 0.05 * rf,
        "files: predicted {pf}, real {rf}"
    );
    // much less than the FULL: it is an incremental prediction
    assert!(pb < 0.6 * env.row(&full)["data_bytes"].as_f64().unwrap());

    let args = env.backup_args_on(&env.pg, "delta", &["--dry-run"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(!walnut(&a).status.success(), "DELTA cannot be predicted");
}

/// The table hammered by updates tops the churn list, by name when the server answers,
/// by relfilenode without it; --since an LSN after the hammering leaves it out.
#[test]
fn churn_names_the_hammered_table() {
    let env = Env::new("ia-churn");
    env.pg.psql(
        "postgres",
        "create table hot (id int primary key, v int) with (autovacuum_enabled = off); \
         insert into hot select g, 0 from generate_series(1, 20000) g; \
         create table cold (id int, v int) with (autovacuum_enabled = off); \
         insert into cold select g, 0 from generate_series(1, 100) g",
    );
    env.switch_and_wait(&env.pg);
    for _ in 0..3 {
        env.pg.psql("postgres", "update hot set v = v + 1");
    }
    env.switch_and_wait(&env.pg);
    let node = env
        .pg
        .psql("postgres", "select pg_relation_filenode('hot')");
    let mut conn = env.pg.conn_args();
    let mut a = vec!["--churn", "--format", "json"];
    a.extend(conn.iter().map(String::as_str));
    let r = json(show_archive(&env, &a), "churn");
    let top = &r["relations"][0];
    assert_eq!(top["relation"], "hot", "{r}");
    assert_eq!(top["schema"], "public");
    assert_eq!(top["database"], "postgres");
    assert_eq!(top["relfilenode"].as_u64().unwrap().to_string(), node);
    assert!(top["changed_bytes"].as_u64().unwrap() >= 8192 * 80, "{top}");
    let text = ok(
        show_archive(
            &env,
            &["--churn", "-h", &conn[1], "-p", &conn[3], "-U", "postgres"],
        ),
        "churn text",
    );
    let first = text.lines().nth(2).unwrap();
    assert!(first.contains("postgres.public.hot"), "{text}");

    let r = json(
        show_archive(&env, &["--churn", "--no-connect", "--format", "json"]),
        "churn oids",
    );
    assert_eq!(
        r["relations"][0]["relfilenode"]
            .as_u64()
            .unwrap()
            .to_string(),
        node
    );
    assert!(r["relations"][0]["relation"].is_null());

    let since = env.pg.psql("postgres", "select pg_current_wal_lsn()");
    env.pg.psql("postgres", "update cold set v = v + 1");
    env.switch_and_wait(&env.pg);
    conn.truncate(6);
    let mut a = vec![
        "--churn", "--format", "json", "--limit", "0", "--since", &since,
    ];
    a.extend(conn.iter().map(String::as_str));
    let r = json(show_archive(&env, &a), "churn since");
    let rels = r["relations"].as_array().unwrap();
    assert!(rels.iter().any(|x| x["relation"] == "cold"), "{r}");
    assert!(!rels.iter().any(|x| x["relation"] == "hot"), "{r}");
}

/// A copy restored to a restore point after the backup and promoted starts timeline 2 in
/// the same archive: the backup then has a window on each timeline, the one on timeline
/// 2 following its history through timeline 1's segments.
#[test]
fn pitr_windows_follow_the_timeline_history() {
    let env = Env::new("ia-tli");
    env.pg.psql("postgres", "create table h (a int)");
    let id = env.backup("full", &[]);
    env.pg.psql("postgres", "insert into h values (1)");
    env.switch_and_wait(&env.pg);
    env.pg
        .psql("postgres", "select pg_create_restore_point('branch')");
    env.switch_and_wait(&env.pg);
    let mut r = env.restore_and_start(
        "r-tli",
        &[
            "-i",
            &id,
            "--recovery-target-name",
            "branch",
            "--recovery-target-action",
            "promote",
        ],
        true,
    );
    super::env::wait_promoted(&r);
    r.psql("postgres", "insert into h values (2)");
    let s2 = env.switch_and_wait(&r);
    assert_eq!(s2.tli(), 2);
    r.stop();
    let row = env.row(&id);
    let w = row["pitr"].as_array().unwrap();
    assert_eq!(w.len(), 2, "{row}");
    let t1 = w.iter().find(|h| h["timeline"] == 1).unwrap();
    let t2 = w.iter().find(|h| h["timeline"] == 2).unwrap();
    assert_eq!(t1["from_lsn"], t2["from_lsn"]);
    let end2: Lsn = t2["to_lsn"].as_str().unwrap().parse().unwrap();
    let ar = env.archive();
    let s2_start = s2.segno(ar.seg_size()).unwrap() * u64::from(ar.seg_size());
    assert!(
        end2.0 > s2_start,
        "timeline 2's window reaches its segment {s2}: {t2}"
    );
    assert!(
        t2["ends"].as_str().unwrap().contains("end of the archive"),
        "{t2}"
    );
}
