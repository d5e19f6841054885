//! `walnut check` and `walnut metrics` against a real PostgreSQL 15 archiving into walnut.
use std::process::{Command, Output};

use serde_json::Value;

use super::backup::{stderr, Env};
use super::harness::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `walnut check -B CAT --instance INST` with the server's connection options.
fn check(env: &Env, cat: &str, instance: &str, extra: &[&str]) -> Output {
    let conn = env.pg.conn_args();
    let mut args = vec!["check", "-B", cat, "--instance", instance];
    args.extend(conn.iter().map(String::as_str));
    args.extend_from_slice(extra);
    walnut(&args)
}

/// The status of check `name` in a text report ("OK", "FAIL", "NOTICE"), and its line.
fn line<'a>(text: &'a str, name: &str) -> (&'a str, &'a str) {
    text.lines()
        .find_map(|l| {
            let (tag, rest) = l.split_once(' ')?;
            rest.trim_start()
                .starts_with(&format!("{name}:"))
                .then_some((tag, l))
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{text}"))
}

/// A healthy setup passes every check, in text and JSON; the switched segment is found
/// archived and indexed; bad usage exits 2.
#[test]
fn check_passes_on_a_healthy_setup() {
    let env = Env::new("ck-ok");
    let out = check(&env, env.cat(), "db", &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    for name in [
        "connection",
        "version",
        "system_identifier",
        "wal_level",
        "archive_mode",
        "archive_library",
        "archive_command",
        "full_page_writes",
        "data_checksums",
        "archive",
    ] {
        assert_eq!(line(&text, name).0, "OK", "{text}");
    }
    assert!(
        line(&text, "archive").1.contains("archived and indexed"),
        "{text}"
    );

    // The segment it names is really in the catalog, indexed.
    let seg: walnut::WalFileName = line(&text, "archive")
        .1
        .split_whitespace()
        .find(|w| w.len() == 24)
        .unwrap()
        .parse()
        .unwrap();
    let catalog = walnut::catalog::Catalog::open(&env.cat).unwrap();
    let ar = walnut::archive::WalArchive::open(&catalog, "db").unwrap();
    let segno = seg.segno(ar.seg_size()).unwrap();
    assert!(matches!(
        ar.index_state(seg.tli(), segno).unwrap(),
        walnut::archive::IndexState::Indexed(_)
    ));

    let out = check(&env, env.cat(), "db", &["--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["ok"], true);
    assert_eq!(v["instance"], "db");
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["status"] == "ok"));

    let usage = walnut(&["check", "-B", env.cat()]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
}

/// A catalog the server does not archive into fails the archive_command check (and the
/// archive round trip is not attempted).
#[test]
fn check_fails_when_archive_command_names_another_catalog() {
    let env = Env::new("ck-other");
    let other = env.dir.path().join("other");
    let o = other.to_str().unwrap();
    ok(walnut(&["init", "-B", o]), "init other");
    let data = env.pg.data.to_str().unwrap().to_string();
    ok(
        walnut(&["add-instance", "-B", o, "--instance", "db", "-D", &data]),
        "add-instance other",
    );
    let out = check(&env, o, "db", &[]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let (tag, l) = line(&text, "archive_command");
    assert_eq!(tag, "FAIL", "{text}");
    assert!(l.contains("not this one"), "{l}");
    assert_eq!(line(&text, "system_identifier").0, "OK");
    assert_eq!(line(&text, "archive").0, "NOTICE", "{text}");
    let json = check(&env, o, "db", &["--format", "json"]);
    assert_eq!(json.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["ok"], false);
}

/// A catalog the archiver cannot write to: the check forces a switch, sees
/// pg_stat_archiver's failure for that segment and reports it with its time; once the
/// catalog is writable again the check passes.
#[test]
fn check_reports_a_failing_archive_command() {
    let env = Env::new("ck-fail");
    let inst = env.cat.join("instances/db");
    // Tests run as root; the archiver runs as postgres, for whom this is read-only.
    run_ok(Command::new("chmod").arg("-R").arg("a-w").arg(&inst));
    let out = check(&env, env.cat(), "db", &["--archive-timeout", "60"]);
    run_ok(Command::new("chmod").arg("-R").arg("u+w").arg(&inst));
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}{}", stderr(&out));
    let (tag, l) = line(&text, "archive");
    assert_eq!(tag, "FAIL", "{text}");
    assert!(
        l.contains("archive_command failed for 0000000100000000"),
        "{l}"
    );
    assert!(l.contains(" at 20"), "no failure time: {l}");
    for name in [
        "wal_level",
        "archive_mode",
        "archive_command",
        "system_identifier",
    ] {
        assert_eq!(line(&text, name).0, "OK", "{text}");
    }
    let again = check(&env, env.cat(), "db", &["--archive-timeout", "120"]);
    assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
}

/// An instance registered from another cluster: the system identifiers differ.
#[test]
fn check_fails_on_a_wrong_system_identifier() {
    let env = Env::new("ck-sysid");
    let stranger = Pg::init(
        &pg_bin(),
        env.dir.path(),
        "stranger",
        &["-k", "--wal-segsize=1"],
    );
    let data = stranger.data.to_str().unwrap().to_string();
    ok(
        walnut(&[
            "add-instance",
            "-B",
            env.cat(),
            "--instance",
            "strange",
            "-D",
            &data,
        ]),
        "add-instance strange",
    );
    let out = check(&env, env.cat(), "strange", &["--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "system_identifier")
        .unwrap()
        .clone();
    assert_eq!(c["status"], "fail", "{v}");
    assert!(
        c["detail"].as_str().unwrap().contains("wrong server"),
        "{c}"
    );
}
