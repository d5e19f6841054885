//! `walnut check` and `walnut metrics` against a real PostgreSQL 15 archiving into walnut.
use std::process::{Command, Output};

use serde_json::Value;

use super::env::{stderr, stdout, Env};
use super::harness::*;

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

/// `walnut metrics --output FILE` as the cluster owner; returns the file's samples by
/// "name{labels}" and the raw text.
fn metrics(env: &Env, extra: &[&str]) -> (std::collections::BTreeMap<String, f64>, String) {
    let out_dir = pg_mkdir(&env.dir.path().join("textfile"));
    let file = out_dir.join("walnut.prom");
    let conn = env.pg.conn_args();
    let f = file.to_str().unwrap();
    let mut args = vec![
        "metrics",
        "-B",
        env.cat(),
        "--instance",
        "db",
        "--output",
        f,
    ];
    args.extend(conn.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let out = walnut(&args);
    assert!(out.status.success(), "metrics: {}", stderr(&out));
    assert!(stdout(&out).is_empty(), "--output writes nothing to stdout");
    let names: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["walnut.prom"], "a temporary file was left behind");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'), "no trailing newline");
    let mut samples = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let w: Vec<&str> = l.split(' ').collect();
        // name{labels} value, and no timestamp
        assert_eq!(w.len(), 2, "sample line {l:?}");
        assert!(w[0].contains("instance=\"db\""), "{l}");
        let lower = w[0].split_once('{').unwrap().1;
        assert_eq!(
            lower,
            lower.to_lowercase(),
            "label values are lower case: {l}"
        );
        samples.insert(w[0].to_string(), w[1].parse::<f64>().unwrap());
    }
    promtool_check(&text);
    (samples, text)
}

/// `promtool check metrics` must accept the text without a remark. Without promtool (a
/// developer machine) the check is skipped with a message; in CI it must be there.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed (.ci/run installs Debian's prometheus package)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED promtool check: promtool not installed (apt-get install prometheus)"
        );
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{text}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
}

fn get(s: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:#?}", s.keys().collect::<Vec<_>>()))
}

fn epoch(s: &Value) -> f64 {
    walnut::backup::meta::parse_time(s.as_str().unwrap()).unwrap() as f64
}

/// A catalog in a known state (a FULL and a PAGE, a validated chain, an archive with a
/// known number of segments) gives exactly the expected values; after damage (a corrupt
/// FULL, a lost segment, a lost index) the counts follow; promtool accepts every output.
#[test]
fn metrics_report_the_catalog_state() {
    let env = Env::new("mx-metrics");
    let pg = &env.pg;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup("full", &["--compress", "lz4"]);
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let page = env.backup("page", &[]);
    pg.pgbench(&["-t", "50", "-n", "postgres"]);
    env.switch_and_wait(pg);
    ok(
        walnut(&["validate", "-B", env.cat(), "--instance", "db"]),
        "validate",
    );
    let rows = env.show();
    let row = |id: &str| rows.iter().find(|b| b["id"] == id).unwrap().clone();
    let arch: Value = serde_json::from_str(&ok(
        walnut(&[
            "show",
            "-B",
            env.cat(),
            "--instance",
            "db",
            "--archive",
            "--format",
            "json",
        ]),
        "show --archive",
    ))
    .unwrap();
    let tl = &arch["timelines"][0];
    let segments = tl["segments"].as_f64().unwrap();

    let (s, _) = metrics(&env, &[]);
    let l = |name: &str, extra: &str| format!("{name}{{instance=\"db\"{extra}}}");
    for (mode, id) in [("full", &full), ("page", &page)] {
        let b = row(id);
        let m = format!(",mode=\"{mode}\"");
        assert_eq!(
            get(&s, &l("walnut_backup_last_success_timestamp_seconds", &m)),
            epoch(&b["end_time"])
        );
        assert_eq!(
            get(&s, &l("walnut_backup_last_duration_seconds", &m)),
            epoch(&b["end_time"]) - epoch(&b["start_time"])
        );
        assert_eq!(
            get(&s, &l("walnut_backup_last_size_bytes", &m)),
            b["data_bytes"].as_f64().unwrap()
        );
    }
    assert!(
        !s.keys().any(|k| k.contains("mode=\"delta\"")),
        "no DELTA was taken"
    );
    assert_eq!(get(&s, &l("walnut_backups", ",status=\"ok\"")), 2.0);
    for st in ["running", "error", "corrupt", "orphan"] {
        assert_eq!(
            get(&s, &l("walnut_backups", &format!(",status=\"{st}\""))),
            0.0
        );
    }
    assert_eq!(get(&s, &l("walnut_archive_segments", "")), segments);
    assert_eq!(get(&s, &l("walnut_archive_segments_unindexed", "")), 0.0);
    assert_eq!(get(&s, &l("walnut_archive_gaps", "")), 0.0);
    let now = t0 + 3600.0;
    let last = get(&s, &l("walnut_archive_last_segment_timestamp_seconds", ""));
    assert!(last >= t0 && last < now, "{last}");
    // Just after a switch that was archived, the server is less than a segment ahead.
    assert_eq!(get(&s, &l("walnut_server_up", "")), 1.0);
    let lag = get(&s, &l("walnut_archive_lag_bytes", ""));
    assert!(lag < (1 << 20) as f64, "lag {lag}");
    assert_eq!(
        get(&s, &l("walnut_pitr_earliest_timestamp_seconds", "")),
        epoch(&row(&full)["recovery_time"])
    );
    let latest = get(&s, &l("walnut_pitr_latest_timestamp_seconds", ""));
    assert!(
        latest >= epoch(&row(&page)["end_time"]) - 1.0 && latest < now,
        "{latest}"
    );
    assert_eq!(
        latest,
        epoch(&tl["latest_restorable_time"]),
        "show --archive disagrees"
    );
    assert_eq!(
        get(&s, &l("walnut_verify_last_success", ",kind=\"validate\"")),
        1.0
    );
    let vt = get(
        &s,
        &l("walnut_verify_last_timestamp_seconds", ",kind=\"validate\""),
    );
    assert!(vt >= t0 && vt < now);
    assert!(
        !s.keys().any(|k| k.contains("verify-restore")),
        "no verify-restore runs yet"
    );
    let bytes = get(&s, &l("walnut_catalog_bytes", ""));
    assert!(
        bytes > row(&full)["data_bytes"].as_f64().unwrap() / 10.0,
        "{bytes}"
    );

    // Damage: a stored FULL file (validate fails, FULL corrupt, PAGE orphan), an archived
    // segment in the middle (a gap), another's index (unindexed).
    env.damage_stored(pg, &full, "pgbench_accounts");
    let v = walnut(&["validate", "-B", env.cat(), "--instance", "db"]);
    assert_eq!(v.status.code(), Some(1));
    let first: walnut::WalFileName = tl["first_segment"].as_str().unwrap().parse().unwrap();
    let catalog = walnut::catalog::Catalog::open(&env.cat).unwrap();
    let ar = walnut::archive::WalArchive::open(&catalog, "db").unwrap();
    let seg = ar.seg_size();
    let n = first.segno(seg).unwrap();
    let gap = walnut::WalFileName::segment(1, n + 1, seg);
    std::fs::remove_file(ar.data_path(&gap)).unwrap();
    let unidx = walnut::WalFileName::segment(1, n + 3, seg);
    let idx = ar.data_path(&unidx).with_extension("idx");
    std::fs::remove_file(&idx).unwrap_or_else(|e| panic!("{}: {e}", idx.display()));

    let (s, _) = metrics(&env, &["--no-connect"]);
    assert_eq!(
        get(&s, &l("walnut_verify_last_success", ",kind=\"validate\"")),
        0.0
    );
    assert_eq!(get(&s, &l("walnut_backups", ",status=\"ok\"")), 0.0);
    assert_eq!(get(&s, &l("walnut_backups", ",status=\"corrupt\"")), 1.0);
    assert_eq!(get(&s, &l("walnut_backups", ",status=\"orphan\"")), 1.0);
    assert!(
        !s.keys().any(|k| k.starts_with("walnut_backup_last")),
        "no valid backup left"
    );
    assert!(!s.keys().any(|k| k.starts_with("walnut_pitr_earliest")));
    assert_eq!(get(&s, &l("walnut_archive_gaps", "")), 1.0);
    assert_eq!(get(&s, &l("walnut_archive_segments", "")), segments - 1.0);
    assert_eq!(get(&s, &l("walnut_archive_segments_unindexed", "")), 1.0);
    assert!(
        !s.keys().any(|k| k.starts_with("walnut_archive_lag")),
        "--no-connect"
    );
    assert!(!s.keys().any(|k| k.starts_with("walnut_server_up")));
}

/// contrib/install.sh puts stripped binaries (debug information in .debug/, linked),
/// man pages, completions, systemd units and the cron example under a prefix, and the
/// installed binaries run.
#[test]
fn install_sh_installs_into_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    let bins = std::path::Path::new(env!("CARGO_BIN_EXE_walnut"))
        .parent()
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/install.sh");
    run_ok(Command::new(script).arg("--bindir").arg(bins).arg(&prefix));
    for b in ["walnut", "walnut-archive", "walnut-fetch"] {
        let bin = prefix.join("bin").join(b);
        let dbg = prefix.join("bin/.debug").join(format!("{b}.debug"));
        let (bs, ds) = (
            std::fs::metadata(&bin).unwrap().len(),
            std::fs::metadata(&dbg).unwrap().len(),
        );
        assert!(bs < ds, "{b}: stripped {bs} bytes, debug file {ds} bytes");
        let sections = run_ok(Command::new("readelf").arg("-S").arg(&bin));
        assert!(sections.contains(".gnu_debuglink"), "{b} has no debug link");
        assert!(
            !sections.contains(".debug_info"),
            "{b} still has debug info"
        );
        // (walnut-fetch exits 200 even for --version: any parse outcome stops recovery.)
        let v = run(Command::new(&bin).arg("--version"));
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.starts_with(&format!("{b} ")), "{v}");
    }
    for f in [
        "share/man/man1/walnut.1",
        "share/man/man1/walnut-check.1",
        "share/man/man1/walnut-archive.1",
        "share/bash-completion/completions/walnut",
        "share/zsh/site-functions/_walnut",
        "share/fish/vendor_completions.d/walnut.fish",
        "lib/systemd/system/walnut-metrics.service",
        "lib/systemd/system/walnut-metrics.timer",
        "lib/systemd/system/walnut-backup.timer",
        "share/doc/walnut/walnut.cron",
    ] {
        let p = prefix.join(f);
        assert!(std::fs::metadata(&p).unwrap().len() > 0, "{f} missing");
    }
    let bash =
        std::fs::read_to_string(prefix.join("share/bash-completion/completions/walnut")).unwrap();
    assert!(bash.contains("metrics") && bash.contains("--archive-timeout"));
    // A relative prefix is refused before anything is written.
    let out = run(Command::new(script).arg("relative/prefix"));
    assert_eq!(out.status.code(), Some(2));
}

/// The README's example alert rules are valid (`promtool check rules`) and name only
/// metrics that `walnut metrics` writes.
#[test]
fn readme_alert_rules_pass_promtool() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```yaml\n").expect("alert rules in README") + 8;
    let rules = &readme[start..start + readme[start..].find("```").unwrap()];
    for w in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if w.starts_with("walnut_") {
            assert!(
                walnut::metrics::METRIC_NAMES.contains(&w),
                "README rule uses unknown metric {w}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("walnut-rules.yml");
    std::fs::write(&f, rules).unwrap();
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is not installed"
        );
        return;
    }
    run_ok(Command::new("promtool").arg("check").arg("rules").arg(&f));
}

/// On a standby: archive_mode = on is a failure (a standby archives only with 'always'),
/// the WAL switch is not attempted (a standby cannot switch), and with 'always' it passes.
#[test]
fn check_on_a_standby_wants_archive_mode_always() {
    let env = Env::new("ck-standby");
    let data = env.dir.path().join("standby");
    run_ok(
        env.pg
            .client("pg_basebackup")
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast"]),
    );
    let sock = pg_mkdir(&env.dir.path().join("standby-sock"));
    let mut sb = env.pg.existing_like(&data, &sock);
    sb.start();
    assert_eq!(sb.psql("postgres", "select pg_is_in_recovery()"), "t");
    let on_standby = |sb: &Pg| {
        let conn = sb.conn_args();
        let mut args = vec!["check", "-B", env.cat(), "--instance", "db"];
        args.extend(conn.iter().map(String::as_str));
        walnut(&args)
    };
    let out = on_standby(&sb);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let (tag, l) = line(&text, "archive_mode");
    assert_eq!(tag, "FAIL", "{text}");
    assert!(l.contains("standby") && l.contains("always"), "{l}");
    assert_eq!(line(&text, "archive").0, "NOTICE", "{text}");

    sb.stop();
    sb.append_conf("archive_mode = always");
    sb.start();
    let out = on_standby(&sb);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(line(&text, "archive_mode").0, "OK");
    assert!(line(&text, "archive").1.contains("standby"), "{text}");
}
