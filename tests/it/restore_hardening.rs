//! Restore under hostile or careless input (issue 8, §2, §3 restore side, §5 plan-then-
//! execute, §6a): it writes only inside what it owns, refuses running clusters and the
//! catalog, checks every option and every catalog path before the first write, and recovers
//! to a target on an older timeline.
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::env::*;
use super::harness::*;

fn refused(out: Output, what: &str, needles: &[&str]) {
    let e = fails_with(out, what, needles);
    eprintln!("refused ({what}): {}", e.trim());
}

/// Every file and directory below `roots` (links not followed) with its mode and, for
/// files, a checksum of its content; links with their target.
fn snapshot(roots: &[&Path]) -> BTreeMap<PathBuf, (u32, String)> {
    let mut out = BTreeMap::new();
    let mut stack: Vec<PathBuf> = roots.iter().map(|p| p.to_path_buf()).collect();
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(_) => {
                out.insert(p, (0, "absent".into()));
                continue;
            }
        };
        let what = if md.file_type().is_symlink() {
            format!("link {:?}", std::fs::read_link(&p).unwrap())
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir".into()
        } else {
            format!("{:08x}", crc32c::crc32c(&std::fs::read(&p).unwrap()))
        };
        out.insert(p, (md.permissions().mode(), what));
    }
    out
}

fn sentinel(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, format!("sentinel {name}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    p
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

/// The reproduced case: `restore --force -D NEW` without -T while the source cluster, which
/// has a tablespace, runs. It is refused and the live tablespace is untouched; the source
/// server still stops and restarts cleanly. A -T whose OLD matches no tablespace, a
/// relative -T, and a non-empty -T destination without --force are refused too.
#[test]
fn live_tablespace_is_never_overwritten() {
    let mut env = Env::new("rh-livets");
    let ts = env.tablespace_on(&env.pg, "ts1");
    env.pg.psql(
        "postgres",
        "create table in_ts(i int) tablespace ts1; insert into in_ts select generate_series(1, 5000)",
    );
    let id = env.backup1("full");
    let before = snapshot(&[&ts]);
    let new = env.path("new");
    refused(
        env.restore_cmd(&new, &["--force"]),
        "restore without -T over the live tablespace",
        &["tablespace", &ts.display().to_string()],
    );
    refused(
        env.restore_cmd(&new, &["-i", &id, "--force"]),
        "the same with -i",
        &["tablespace"],
    );
    let elsewhere = env.path("ts-new");
    refused(
        env.restore_cmd(
            &new,
            &["-T", &format!("/no/such/ts={}", elsewhere.display())],
        ),
        "-T matching no tablespace",
        &["matches no tablespace"],
    );
    refused(
        env.restore_cmd(&new, &["-T", &format!("{}=relative/ts", ts.display())]),
        "relative -T",
        &["absolute"],
    );
    let full = pg_mkdir(&env.path("full"));
    sentinel(&full, "keep");
    let full_before = snapshot(&[&full]);
    refused(
        env.restore_cmd(
            &new,
            &["-T", &format!("{}={}", ts.display(), full.display())],
        ),
        "non-empty -T destination without --force",
        &["not empty"],
    );
    assert_eq!(snapshot(&[&full]), full_before);
    assert!(!new.exists(), "a refused restore created -D");
    assert!(!elsewhere.exists());
    assert_eq!(snapshot(&[&ts]), before, "the live tablespace changed");

    // the source cluster is intact: it stops cleanly and starts again with its data
    let out = run(env
        .pg
        .cmd("pg_ctl")
        .arg("-D")
        .arg(&env.pg.data)
        .args(["-m", "fast", "-w", "stop"]));
    assert!(out.status.success(), "source server did not stop cleanly");
    env.pg.set_running(false);
    // stopped, its tablespace is still not cleared by --force alone
    refused(
        env.restore_cmd(&new, &["--force"]),
        "restore without -T over the stopped source's tablespace",
        &["not empty", "-T"],
    );
    assert!(!new.exists());
    assert_eq!(snapshot(&[&ts]), before, "the tablespace changed");
    env.pg.start();
    assert_eq!(
        env.pg.psql("postgres", "select count(*) from in_ts"),
        "5000"
    );

    // mapped to an empty directory it restores, and the live tablespace is still untouched
    ok(
        env.restore_cmd(
            &new,
            &["-T", &format!("{}={}", ts.display(), elsewhere.display())],
        ),
        "restore with -T",
    );
    assert!(!is_empty_dir(&elsewhere));
    let map = std::fs::read_to_string(new.join("tablespace_map")).unwrap();
    assert!(map.contains(&elsewhere.display().to_string()), "{map}");
    // again over both: -D and the -T destination are cleared with --force
    let again = [
        "--force",
        "-T",
        &format!("{}={}", ts.display(), elsewhere.display()),
    ]
    .map(String::from);
    let again: Vec<&str> = again.iter().map(String::as_str).collect();
    sentinel(&elsewhere, "stale");
    ok(
        env.restore_cmd(&new, &again),
        "restore again with --force and -T",
    );
    assert!(!elsewhere.join("stale").exists());
    assert!(new.join("global/pg_control").is_file());
    env.pg.stop();
    assert_eq!(
        snapshot(&[&ts])
            .keys()
            .filter(|p| p.to_string_lossy().contains("PG_15"))
            .count(),
        before
            .keys()
            .filter(|p| p.to_string_lossy().contains("PG_15"))
            .count()
    );
}

/// Even with --force, restore refuses: a directory with a running postmaster below it, a
/// directory inside a running data directory, the registered PGDATA while its server runs,
/// the catalog, a directory inside it and one containing it. Nothing changes: sentinels
/// beside the targets and in the catalog keep their content and modes, and the running
/// cluster still stops cleanly.
#[test]
fn running_clusters_and_the_catalog_are_refused() {
    let env = Env::new("rh-running");
    env.backup1("full");
    // another cluster, not registered anywhere, running inside a directory X
    let x = pg_mkdir(&env.path("x"));
    let mut other = Pg::init(&pg_bin(), &x, "other", &["-k"]);
    other.start();
    other.psql(
        "postgres",
        "create table o(i int); insert into o values (7)",
    );
    let s1 = sentinel(&x, "beside-other");
    let s2 = sentinel(&env.cat, "in-catalog");
    let s3 = sentinel(&env.dir.path().join("side"), "beside-targets");
    let sentinels = [s1.as_path(), s2.as_path(), s3.as_path()];
    let before = snapshot(&sentinels);
    let cases: Vec<(PathBuf, &str, Vec<&str>)> = vec![
        (x.clone(), "postmaster below", vec!["is running"]),
        (
            other.data.join("sub"),
            "inside a running PGDATA",
            vec!["is running"],
        ),
        (env.pg.data.clone(), "registered PGDATA", vec!["is running"]),
        (
            env.pg.data.join("base"),
            "inside registered PGDATA",
            vec!["is running"],
        ),
        (env.cat.clone(), "the catalog", vec!["catalog"]),
        (
            env.cat.join("instances/db/x"),
            "inside the catalog",
            vec!["catalog"],
        ),
        (
            env.dir.path().to_path_buf(),
            "containing the catalog",
            vec!["catalog"],
        ),
    ];
    for (target, what, needles) in &cases {
        let existed = target.exists();
        refused(env.restore_cmd(target, &["--force"]), what, needles);
        assert_eq!(target.exists(), existed, "{what}: created -D");
    }
    assert_eq!(snapshot(&sentinels), before, "a sentinel changed");
    assert_eq!(other.psql("postgres", "select i from o"), "7");
    let out = run(other
        .cmd("pg_ctl")
        .arg("-D")
        .arg(&other.data)
        .args(["-m", "fast", "-w", "stop"]));
    assert!(
        out.status.success(),
        "the other cluster did not stop cleanly"
    );
    other.set_running(false);
    // a postmaster.pid that cannot be read is an error, not "not running"
    let y = pg_mkdir(&env.path("y"));
    std::fs::create_dir_all(y.join("d/postmaster.pid")).unwrap();
    refused(
        env.restore_cmd(&y, &["--force"]),
        "unreadable postmaster.pid",
        &["postmaster.pid"],
    );
    assert!(y.join("d/postmaster.pid").is_dir());
    // a fresh mount point (only lost+found) counts as empty; lost+found stays
    let m = pg_mkdir(&env.path("mnt"));
    pg_mkdir(&m.join("lost+found"));
    sentinel(&m.join("lost+found"), "found");
    ok(env.restore_cmd(&m, &[]), "restore into a fresh mount point");
    assert!(m.join("lost+found/found").is_file());
    assert!(m.join("global/pg_control").is_file());
    // a non-empty -D without --force: the message does not start with --force
    let n = pg_mkdir(&env.path("nonempty"));
    sentinel(&n, "data");
    let out = env.restore_cmd(&n, &[]);
    refused(out, "non-empty -D", &["not empty", "\"data\""]);
}

/// Garbage recovery targets, two targets, bad timelines and actions are refused before the
/// first write, with and without -i: -D stays as it was.
#[test]
fn bad_options_are_refused_before_any_write() {
    let env = Env::new("rh-options");
    let id = env.backup1("full");
    let d = pg_mkdir(&env.path("d"));
    let missing = env.path("missing");
    let bad: Vec<Vec<&str>> = vec![
        vec!["--recovery-target-time", "yesterday noon"],
        vec!["--recovery-target-time", "2026-13-45 99:00:00"],
        vec!["--recovery-target-xid", "12abc"],
        vec!["--recovery-target-lsn", "nonsense"],
        vec!["--recovery-target-lsn", "0/1/2"],
        vec!["--recovery-target-name", ""],
        vec!["--recovery-target-timeline", "banana"],
        vec!["--recovery-target-timeline", "0"],
        vec![
            "--recovery-target-xid",
            "100",
            "--recovery-target-name",
            "p",
        ],
        vec![
            "--recovery-target-time",
            "2026-01-01 00:00:00",
            "--recovery-target",
            "immediate",
        ],
    ];
    for args in &bad {
        for with_id in [false, true] {
            let mut a: Vec<&str> = args.clone();
            if with_id {
                a.extend(["-i", &id]);
            }
            refused(env.restore_cmd(&d, &a), &format!("{a:?}"), &[]);
            assert!(is_empty_dir(&d), "{a:?}: a file was written in -D");
            refused(env.restore_cmd(&missing, &a), &format!("{a:?}"), &[]);
            assert!(!missing.exists(), "{a:?}: -D was created");
        }
    }
    refused(
        env.restore_cmd(
            &d,
            &[
                "-i",
                &id,
                "--recovery-target-xid",
                "1",
                "--recovery-target-lsn",
                "0/1",
            ],
        ),
        "two targets",
        &["at most one recovery target"],
    );
    assert!(is_empty_dir(&d));
}

/// Rewrites backup `bdir`'s manifest with `f` applied to its entries (a valid manifest,
/// as whoever can write the catalog could make).
fn forge_manifest(bdir: &Path, f: impl FnOnce(&mut Vec<walnut::format::manifest::FileEntry>)) {
    use walnut::format::manifest::ManifestWriter;
    let p = bdir.join("manifest");
    let mut entries = super::env::manifest_entries(&p).unwrap();
    f(&mut entries);
    let frames = entries.iter().any(|e| e.lz4_frames.is_some());
    let mut w = ManifestWriter::new(Vec::new(), frames).unwrap();
    for e in &entries {
        w.add(e).unwrap();
    }
    std::fs::write(&p, w.finish().unwrap()).unwrap();
}

fn plain_entry(path: &str, content: &[u8]) -> walnut::format::manifest::FileEntry {
    walnut::format::manifest::FileEntry {
        path: path.to_string(),
        storage: walnut::format::manifest::Storage::Full,
        size: content.len() as u64,
        stored_size: content.len() as u64,
        crc32c: crc32c::crc32c(content),
        changed_blocks: None,
        file_blocks: None,
        limit_block: None,
        lz4_frames: None,
    }
}

/// A manifest with an absolute or `../` path (files and directories, their stored content
/// in place with the right CRC) is refused before the first write: nothing appears outside
/// -D, no directory outside it is chmod-ed, -D is not even created.
#[test]
fn hostile_manifest_paths_are_refused() {
    let env = Env::new("rh-manifest");
    let id = env.backup1("full");
    let bdir = env.backup_dir(&id);
    let outside = pg_mkdir(&env.path("outside"));
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s1 = sentinel(&outside, "keep");
    let s2 = sentinel(&env.cat, "in-catalog");
    let abs_file = outside.join("escaped-abs");
    let target = env.path("r");
    let evil = b"evil\n";
    // the stored files a naive restore would read for these entries
    let abs_rel = abs_file.to_str().unwrap().to_string();
    let stored_abs = bdir.join(format!("database/{abs_rel}"));
    std::fs::create_dir_all(stored_abs.parent().unwrap()).unwrap();
    std::fs::write(&stored_abs, evil).unwrap();
    std::fs::write(bdir.join("escaped-dotdot"), evil).unwrap();
    let watch = [
        outside.as_path(),
        s2.as_path(),
        env.dir.path().join("escaped-dotdot").as_path(),
    ]
    .map(Path::to_path_buf);
    let watch: Vec<&Path> = watch.iter().map(PathBuf::as_path).collect();
    let before = snapshot(&watch);
    let cases: Vec<(&str, Vec<walnut::format::manifest::FileEntry>)> = vec![
        ("absolute file", vec![plain_entry(&abs_rel, evil)]),
        ("../ file", vec![plain_entry("../escaped-dotdot", evil)]),
        (
            "absolute directory",
            vec![walnut::format::manifest::FileEntry::dir(
                outside.to_str().unwrap().to_string(),
            )],
        ),
        (
            "../ directory",
            vec![walnut::format::manifest::FileEntry::dir(
                "base/../../outside".into(),
            )],
        ),
    ];
    let original = std::fs::read(bdir.join("manifest")).unwrap();
    for (what, extra) in cases {
        std::fs::write(bdir.join("manifest"), &original).unwrap();
        // the hostile entry first, so that a restore writing in manifest order meets it early
        forge_manifest(&bdir, |v| {
            for (i, e) in extra.into_iter().enumerate() {
                v.insert(i, e);
            }
        });
        refused(
            env.restore_cmd(&target, &["-i", &id]),
            what,
            &["unsafe path"],
        );
        assert!(!target.exists(), "{what}: -D was created");
        assert_eq!(
            snapshot(&watch),
            before,
            "{what}: something outside -D changed"
        );
        assert!(s1.is_file());
    }
}

/// tablespace_map is covered by the manifest: a flipped byte is detected before the first
/// write. A backup from before that (no manifest entry) whose tablespace_map cannot be read
/// is refused too: only a missing file means "no tablespaces".
#[test]
fn tablespace_map_damage_is_detected() {
    let env = Env::new("rh-spcmap");
    let ts = env.tablespace_on(&env.pg, "ts1");
    env.pg.psql(
        "postgres",
        "create table t(i int) tablespace ts1; insert into t values (1)",
    );
    let id = env.backup1("full");
    let bdir = env.backup_dir(&id);
    let target = env.path("r");
    let newts = env.path("ts-r");
    let map_arg = format!("{}={}", ts.display(), newts.display());
    let stored = bdir.join("database/tablespace_map");
    let good = std::fs::read(&stored).expect("tablespace_map stored under database/");
    let mut bad = good.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    std::fs::write(&stored, &bad).unwrap();
    refused(
        env.restore_cmd(&target, &["-i", &id, "-T", &map_arg]),
        "damaged tablespace_map",
        &["tablespace_map", "manifest"],
    );
    assert!(!target.exists() && !newts.exists());
    std::fs::write(&stored, &good).unwrap();
    // an older backup: no manifest entry, the map beside the manifest unreadable
    forge_manifest(&bdir, |v| v.retain(|e| e.path != "tablespace_map"));
    let legacy = bdir.join("tablespace_map");
    std::fs::remove_file(&legacy).unwrap();
    std::fs::create_dir(&legacy).unwrap();
    refused(
        env.restore_cmd(&target, &["-i", &id, "-T", &map_arg]),
        "unreadable tablespace_map",
        &["tablespace_map"],
    );
    assert!(!target.exists() && !newts.exists());
    // readable again: the legacy map is used and the tablespace lands where -T says
    std::fs::remove_dir(&legacy).unwrap();
    let beside = good.clone();
    std::fs::write(&legacy, &beside).unwrap();
    ok(
        env.restore_cmd(&target, &["-i", &id, "-T", &map_arg]),
        "restore of a backup with its map beside the manifest",
    );
    assert!(!is_empty_dir(&newts));
}

/// §6a: a named restore point on timeline 1, beyond the point where timeline 2 (the newest)
/// left it. Restore picks a backup on the point's history (not the newer one on timeline
/// 2) and writes the point's timeline, so recovery reaches it.
#[test]
fn target_on_an_older_timeline_is_reached() {
    let mut env = Env::new("rh-oldtli");
    env.pg.psql(
        "postgres",
        "create table t(i int); insert into t select generate_series(1, 100)",
    );
    let b1 = env.backup1("full");
    env.pg.psql(
        "postgres",
        "insert into t select generate_series(101, 1000)",
    );
    // move timeline 1 well past where timeline 2 will end up
    for _ in 0..6 {
        env.switch_and_wait(&env.pg);
        env.pg.psql("postgres", "insert into t values (0)");
    }
    env.pg.psql("postgres", "delete from t where i = 0");
    env.pg
        .psql("postgres", "select pg_create_restore_point('A')");
    env.pg.psql(
        "postgres",
        "insert into t select generate_series(1001, 2000)",
    );
    env.switch_and_wait(&env.pg);
    env.pg.stop();

    // timeline 2: the backup restored to its end and promoted, archiving into the catalog
    let p2dir = env.path("p2");
    ok(
        env.restore_cmd(
            &p2dir,
            &[
                "-i",
                &b1,
                "--recovery-target",
                "immediate",
                "--recovery-target-action",
                "promote",
            ],
        ),
        "restore to timeline 2",
    );
    let sock2 = pg_mkdir(&env.path("p2-sock"));
    let mut p2 = Pg::existing(&pg_bin(), &p2dir, &sock2);
    p2.start();
    wait_promoted(&p2);
    assert_eq!(p2.psql("postgres", "select count(*) from t"), "100");
    p2.psql(
        "postgres",
        "insert into t select generate_series(5001, 5010)",
    );
    let b2 = env.backup1_on(&p2, "full");
    env.switch_and_wait(&p2);
    p2.stop();
    let row = env.row(&b2);
    assert!(!row.is_null(), "backup {b2} not shown");
    assert_eq!(row["timeline"], 2);

    // restore to A without -i: the timeline-1 backup, recovery on timeline 1
    let rdir = env.path("r");
    ok(
        env.restore_cmd(
            &rdir,
            &[
                "--recovery-target-name",
                "A",
                "--recovery-target-action",
                "pause",
            ],
        ),
        "restore to A",
    );
    let auto = std::fs::read_to_string(rdir.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("recovery_target_timeline = '1'"),
        "no timeline written:\n{auto}"
    );
    let label = std::fs::read_to_string(rdir.join("backup_label")).unwrap();
    assert!(label.contains("TIMELINE: 1"), "{label}");
    let sock = pg_mkdir(&env.path("r-sock"));
    let mut r = Pg::existing(&pg_bin(), &rdir, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_paused(&r);
    assert_eq!(r.psql("postgres", "select count(*) from t"), "1000");
    assert_eq!(
        r.psql("postgres", "select count(*) from t where i > 5000"),
        "0"
    );
    r.stop();
}
