//! `restore --plan` with a time target: the position recovery stops at comes from the
//! block indexes' commit times, checked against `pg_waldump`'s listing of the same WAL; a
//! time no archived commit reaches makes the plan fail before anything is written.

use crate::env::{stdout, Env};
use crate::harness::*;

/// The UTC time on the server, to whole seconds, as recovery_target_time takes it.
fn server_time(pg: &Pg) -> String {
    pg.psql(
        "postgres",
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00'",
    )
}

/// The plan for a time target, as JSON, and whether it succeeded.
fn plan(env: &Env, time: &str) -> (bool, serde_json::Value, String) {
    let target = env.path("never-written");
    let out = env.restore_cmd(
        &target,
        &["--plan", "--recovery-target-time", time, "--format", "json"],
    );
    assert!(!target.exists(), "--plan created {}", target.display());
    let text = stdout(&out);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("plan output is not JSON ({e}): {text}"));
    (out.status.success(), v, text)
}

#[test]
fn plan_finds_where_a_time_target_stops_recovery() {
    let env = Env::new("plan-time");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup1("full");
    let start = env.row(&full)["start_lsn"].as_str().unwrap().to_string();
    // commits, a quiet second, the target, a quiet second, commits after it, more WAL
    env.pg.pgbench(&["-n", "-t", "200", "postgres"]);
    env.switch_and_wait(&env.pg);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let target = server_time(&env.pg);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    for _ in 0..3 {
        env.pg.pgbench(&["-n", "-t", "200", "postgres"]);
        env.switch_and_wait(&env.pg);
    }
    let end = env.pg.psql("postgres", "select pg_current_wal_lsn()");
    env.switch_and_wait(&env.pg);

    // the oracle: the first commit after the target in pg_waldump's listing
    let out = run(env
        .pg
        .cmd("pg_waldump")
        .env("TZ", "UTC")
        .arg("-p")
        .arg(env.pg.data.join("pg_wal"))
        .args(["-r", "Transaction", "-s", &start, "-e", &end]));
    assert!(
        out.status.success(),
        "pg_waldump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = stdout(&out);
    let wanted = target.trim_end_matches("+00");
    let first_after = listing
        .lines()
        .find_map(|l| {
            let (_, desc) = l.split_once("desc: COMMIT ")?;
            let when = desc.get(..26).unwrap_or(desc).trim_end_matches(" UTC");
            let lsn = l.split_once("lsn: ")?.1.split(',').next()?;
            (when > wanted).then(|| lsn.parse::<walnut::Lsn>().unwrap())
        })
        .unwrap_or_else(|| panic!("no commit after {target} in pg_waldump's listing"));
    let seg = walnut::WalFileName::segment(1, first_after.segno(1 << 20), 1 << 20).to_string();

    let (ok, v, text) = plan(&env, &target);
    assert!(ok, "plan to {target} failed: {text}");
    let t = &v["recovery_target"];
    assert_eq!(t["kind"], "time", "{text}");
    assert_eq!(
        t["segment"],
        seg.as_str(),
        "first commit after {target} at {first_after}: {text}"
    );
    // the WAL it needs runs to that segment
    let required: Vec<&str> = v["wal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["required"] == true)
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(required.last().copied(), Some(seg.as_str()), "{text}");

    // a time after every archived commit: recovery would end before it
    let (ok, v, text) = plan(&env, "2999-01-01 00:00:00+00");
    assert!(!ok, "a plan to a time no commit reaches succeeded: {text}");
    assert_eq!(v["ok"], false, "{text}");
    let check = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "recovery target" && c["ok"] == false)
        .unwrap_or_else(|| panic!("no failed recovery target check: {text}"));
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("recovery would end before reaching the target"),
        "{text}"
    );
    // the text form names the position
    let out = env.restore_cmd(
        &env.path("never-written"),
        &["--plan", "--recovery-target-time", &target],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("in segment {seg}")), "{text}");
}
