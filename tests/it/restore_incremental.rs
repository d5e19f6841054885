//! Incremental restore into an existing data directory (issue 13): both modes rewrite only
//! what differs and recover to the source's state; every refusal comes before any write;
//! `--plan` writes nothing and fails when WAL is missing.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::env::*;
use super::harness::*;

/// Every entry below `root` (links not followed) with a checksum of its content.
pub(super) fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let what = if md.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&p).unwrap())
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir".into()
        } else {
            format!(
                "{:08x} {}",
                crc32c::crc32c(&std::fs::read(&p).unwrap()),
                md.len()
            )
        };
        out.insert(p, what);
    }
    out
}

/// Restores backup `id` into `dir`, starts it as a promoted copy without archiving, runs
/// `work` on it and stops it cleanly.
pub(super) fn promoted_copy(env: &Env, id: &str, name: &str, work: impl FnOnce(&Pg)) -> Pg {
    let dir = env.path(name);
    ok(
        env.restore_cmd(
            &dir,
            &[
                "-i",
                id,
                "--recovery-target",
                "immediate",
                "--recovery-target-action",
                "promote",
            ],
        ),
        "restore the copy",
    );
    let sock = pg_mkdir(&env.path(&format!("{name}-sock")));
    let mut pg = env.pg.existing_like(&dir, &sock);
    pg.append_conf("archive_mode = off");
    pg.start();
    wait_promoted(&pg);
    work(&pg);
    pg.stop();
    pg
}

pub(super) fn incremental(
    env: &Env,
    dir: &Path,
    mode: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut a = vec!["--incremental-mode", mode];
    a.extend_from_slice(extra);
    env.restore_cmd(dir, &a)
}

/// "N of M bytes written" from the restore's report line.
pub(super) fn bytes_written(out: &str) -> (u64, u64) {
    let s = out.split(": ").nth(1).unwrap_or("");
    let w: Vec<&str> = s.split_whitespace().collect();
    (w[0].parse().unwrap(), w[2].parse().unwrap())
}

/// pg_amcheck (heapallindexed) on the running `pg`, then stops it and runs pg_checksums:
/// both must be clean.
pub(super) fn check_clean(pg: &mut Pg, what: &str) {
    let out = run(pg
        .client("pg_amcheck")
        .arg("--all")
        .arg("--install-missing")
        .arg("--heapallindexed"));
    assert!(
        out.status.success(),
        "{what}: pg_amcheck failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    pg.stop();
    let out = run(pg
        .cmd("pg_checksums")
        .arg("--check")
        .arg("-D")
        .arg(&pg.data));
    assert!(
        out.status.success(),
        "{what}: pg_checksums: {}",
        stderr(&out)
    );
}

/// FULL restored and run as a promoted copy that changes ~5% of a pgbench database, then
/// stopped; the source changes too and takes a PAGE. Restoring the PAGE over the copy in
/// checksum and in lsn mode gives the source's dump, clean checksums and amcheck, and
/// writes far less than a full restore.
#[test]
fn incremental_restore_in_both_modes() {
    let env = Env::new("rinc-both");
    env.pg.pgbench(&["-i", "-s", "5", "-q", "postgres"]);
    env.pg.psql("postgres", "checkpoint");
    let full = env.backup1("full");
    // the copy diverges from the chain: ~5% of pgbench_accounts' pages change
    let copy = promoted_copy(&env, &full, "copy", |pg| {
        pg.pgbench(&["-n", "-t", "450", "-c", "1", "postgres"]);
        pg.psql("postgres", "create table only_in_copy as select 1 as i");
        pg.psql("postgres", "checkpoint");
    });
    // the source moves on and takes a PAGE
    env.pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
    env.pg.psql(
        "postgres",
        "create table after_full as select generate_series(1, 1000) i",
    );
    let page = env.backup1("page");
    env.switch_and_wait(&env.pg);
    let want = Env::dumpall(&env.pg);

    // a second copy of the destination for the other mode
    let copy2 = env.path("copy2");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&copy.data)
            .arg(&copy2),
    );

    let mut sizes = Vec::new();
    for (mode, dir) in [("checksum", copy.data.clone()), ("lsn", copy2.clone())] {
        let out = ok(
            incremental(&env, &dir, mode, &["-i", &page]),
            &format!("incremental restore ({mode})"),
        );
        eprintln!("{mode}: {}", out.trim());
        let (written, total) = bytes_written(&out);
        let kept: u64 = out
            .trim()
            .split(", ")
            .find(|s| s.ends_with("blocks kept unread"))
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        // both modes keep most blocks without reading the backup (checksum mode by the
        // backups' block checksums)
        assert!(kept > 1000, "{mode}: {kept} blocks kept");
        sizes.push((mode, written, total));
        assert!(
            !dir.join("pg_wal/00000002.history").exists(),
            "{mode}: the copy's WAL was kept"
        );
        let sock = pg_mkdir(&env.path(&format!("{mode}-sock")));
        let mut r = env.pg.existing_like(&dir, &sock);
        r.append_conf("archive_mode = off");
        r.start();
        wait_promoted(&r);
        same_dump(&Env::dumpall(&r), &want, mode);
        assert_eq!(
            r.psql(
                "postgres",
                "select count(*) from pg_class where relname = 'only_in_copy'"
            ),
            "0"
        );
        check_clean(&mut r, mode);
    }
    // ~5% of the pages changed on each side: far below a full restore
    for (mode, written, total) in &sizes {
        assert!(*written > 0, "{mode}: nothing written");
        assert!(
            *written * 4 < *total,
            "{mode}: {written} of {total} bytes written, expected under a quarter"
        );
    }
    let (c, l) = (sizes[0].1, sizes[1].1);
    assert!(l <= c + (1 << 20), "lsn mode wrote {l}, checksum mode {c}");
}

pub(super) fn refused_unchanged(
    out: std::process::Output,
    dir: &Path,
    before: &BTreeMap<PathBuf, String>,
    needles: &[&str],
    what: &str,
) {
    let e = fails_with(out, what, needles);
    eprintln!("refused ({what}): {}", e.trim());
    assert_eq!(&snapshot(dir), before, "{what}: the directory changed");
}

/// A running server, a foreign system identifier, a dirty shutdown (lsn mode) and a
/// backup_label (lsn mode) are each refused before any write, with their own message;
/// lsn-mode refusals offer checksum mode.
#[test]
fn incremental_restore_refusals() {
    let mut env = Env::new("rinc-refuse");
    env.pg.psql(
        "postgres",
        "create table t as select generate_series(1, 1000) i",
    );
    let full = env.backup1("full");
    let mut copy = promoted_copy(&env, &full, "copy", |pg| {
        pg.psql("postgres", "insert into t values (0)");
    });
    env.switch_and_wait(&env.pg);

    // a running server
    copy.start();
    let before = snapshot(&copy.data);
    refused_unchanged(
        incremental(&env, &copy.data, "checksum", &[]),
        &copy.data,
        &before,
        &["running"],
        "running server",
    );
    // a dirty shutdown: refused in lsn mode, with checksum mode offered
    let mut c = copy.cmd("pg_ctl");
    c.arg("-D")
        .arg(&copy.data)
        .arg("-m")
        .arg("immediate")
        .arg("-w")
        .arg("stop");
    run_ok(&mut c);
    copy.set_running(false);
    let before = snapshot(&copy.data);
    refused_unchanged(
        incremental(&env, &copy.data, "lsn", &[]),
        &copy.data,
        &before,
        &["clean shutdown", "--incremental-mode checksum"],
        "dirty shutdown",
    );
    // a backup_label: a restored directory that never started
    let fresh = env.path("fresh");
    ok(env.restore_cmd(&fresh, &["-i", &full]), "fresh restore");
    let before = snapshot(&fresh);
    refused_unchanged(
        incremental(&env, &fresh, "lsn", &[]),
        &fresh,
        &before,
        &["backup_label", "--incremental-mode checksum"],
        "backup_label",
    );
    // a foreign system identifier
    let other = Pg::init(&pg_bin(), &pg_mkdir(&env.path("o")), "other", &["-k"]);
    let before = snapshot(&other.data);
    refused_unchanged(
        incremental(&env, &other.data, "checksum", &[]),
        &other.data,
        &before,
        &["system identifier"],
        "foreign system",
    );
    // an unreadable pid file
    std::fs::write(copy.data.join("postmaster.pid"), "garbage\n").unwrap();
    let before = snapshot(&copy.data);
    refused_unchanged(
        incremental(&env, &copy.data, "checksum", &[]),
        &copy.data,
        &before,
        &["postmaster.pid"],
        "unreadable pid file",
    );
    std::fs::remove_file(copy.data.join("postmaster.pid")).unwrap();
    // the dirty copy is fine for checksum mode
    ok(
        incremental(&env, &copy.data, "checksum", &[]),
        "checksum mode after a dirty shutdown",
    );
    let sock = pg_mkdir(&env.path("c2-sock"));
    let mut r = env.pg.existing_like(&copy.data, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted(&r);
    assert_eq!(r.psql("postgres", "select count(*) from t"), "1000");
    r.stop();
    env.pg.stop();
}

/// `--plan --format json` describes the restore and writes nothing; with a WAL segment
/// that recovery needs gone from the archive it exits non-zero.
#[test]
fn restore_plan_changes_nothing() {
    let env = Env::new("rinc-plan");
    env.pg.psql(
        "postgres",
        "create table t as select generate_series(1, 1000) i",
    );
    let full = env.backup1("full");
    let copy = promoted_copy(&env, &full, "copy", |pg| {
        pg.psql("postgres", "insert into t values (0)");
    });
    env.pg.psql("postgres", "insert into t values (2)");
    let page = env.backup1("page");
    env.switch_and_wait(&env.pg);

    let before = snapshot(&copy.data);
    let out = incremental(&env, &copy.data, "lsn", &["--plan", "--format", "json"]);
    let text = ok(out, "plan");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], true, "{text}");
    assert_eq!(v["backup_id"], page.as_str());
    assert_eq!(v["kind"], "lsn");
    let chain: Vec<&str> = v["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(chain, vec![page.as_str(), full.as_str()]);
    assert!(v["bytes_to_write"].as_u64().unwrap() > 0);
    assert!(v["bytes_to_write"].as_u64().unwrap() < v["bytes_total"].as_u64().unwrap());
    assert!(v["tablespaces"].as_array().unwrap().is_empty());
    let wal = v["wal"].as_array().unwrap();
    assert!(!wal.is_empty());
    assert!(
        wal.iter()
            .all(|s| s["present"] == true && s["indexed"] == true),
        "{text}"
    );
    assert_eq!(v["recovery_target"]["kind"], "latest");
    let checks = v["checks"].as_array().unwrap();
    for name in [
        "no server running",
        "system identifier",
        "clean shutdown",
        "timeline history",
        "data checksums",
        "no backup_label",
    ] {
        assert!(
            checks.iter().any(|c| c["name"] == name && c["ok"] == true),
            "check {name} missing: {text}"
        );
    }
    assert!(v["databases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["name"] == "postgres"));
    assert_eq!(
        snapshot(&copy.data),
        before,
        "--plan wrote into the destination"
    );

    // a full restore plan into a new directory, text
    let newdir = env.path("new");
    let out = env.restore_cmd(&newdir, &["--dry-run"]);
    let text = ok(out, "plan text");
    assert!(text.contains("would succeed"), "{text}");
    assert!(!newdir.exists(), "--dry-run created the target");

    // a required segment gone: the plan fails, naming it
    let first = wal[0]["name"].as_str().unwrap().to_string();
    let mut found = Vec::new();
    let mut stack = vec![env.cat.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_string_lossy().starts_with(&first)
                && !p.to_string_lossy().contains(".idx")
            {
                found.push(p);
            }
        }
    }
    assert!(
        !found.is_empty(),
        "segment {first} not found in the catalog"
    );
    for p in &found {
        std::fs::rename(p, p.with_extension("hidden")).unwrap();
    }
    let out = incremental(&env, &copy.data, "lsn", &["--plan", "--format", "json"]);
    assert!(!out.status.success(), "plan succeeded without WAL");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["ok"], false);
    assert!(stdout(&out).contains(&first));
    for p in &found {
        std::fs::rename(p.with_extension("hidden"), p).unwrap();
    }
    assert_eq!(
        snapshot(&copy.data),
        before,
        "--plan wrote into the destination"
    );
}
