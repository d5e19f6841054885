//! `walnut validate` sees what restore would see (issue 8 §4): broken chains, damaged WAL
//! inside a backup's range and after it, "could not read" kept apart from "damaged", and
//! stored files that are links.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use super::env::{stderr, stdout, Env};

/// The WAL segments (1 MiB) from a backup's start to its stop.
fn backup_segments(env: &Env, id: &str) -> Vec<walnut::WalFileName> {
    let row = env.row(id);
    let lsn = |k: &str| -> walnut::Lsn { row[k].as_str().unwrap().parse().unwrap() };
    let (start, stop) = (lsn("start_lsn"), lsn("stop_lsn"));
    let tli = row["timeline"].as_u64().unwrap() as u32;
    (start.segno(1 << 20)..=walnut::Lsn(stop.0 - 1).segno(1 << 20))
        .map(|s| walnut::WalFileName::segment(tli, s, 1 << 20))
        .collect()
}

fn succeeds(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} should succeed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn fails_with(out: Output, what: &str, needles: &[&str]) -> String {
    let e = stderr(&out);
    assert!(
        !out.status.success(),
        "{what} should fail\nstdout:\n{}\nstderr:\n{e}",
        stdout(&out)
    );
    assert_ne!(out.status.code(), Some(2), "{what}: usage error\n{e}");
    for n in needles {
        assert!(
            e.contains(n),
            "{what}: error should mention {n:?}:\n{e}\nstdout:\n{}",
            stdout(&out)
        );
    }
    e
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = std::fs::read(p).unwrap();
    b[at] ^= 0x01;
    std::fs::write(p, &b).unwrap();
}

/// Damages an archived file's LZ4 data (16 bytes two thirds in, past the metadata header).
/// A single flipped bit can leave the decoded bytes unchanged (e.g. a match offset inside a
/// run of zeros), which is no damage at all; 16 bytes cannot.
fn damage_archived(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let at = b.len() - b.len() / 3;
    assert!(at > 400, "archived file too small: {}", b.len());
    for x in &mut b[at..at + 16] {
        *x ^= 0x5A;
    }
    std::fs::write(p, &b).unwrap();
}

/// A FULL whose backup.json is damaged (checksum mismatch, then garbage) is reported as a
/// damaged backup by directory name, its PAGE child becomes ORPHAN and validate fails, with
/// or without -i; with the metadata repaired, both are OK again.
#[test]
fn validate_checks_chains_through_damaged_metadata() {
    let env = Env::new("val-chain");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup1("full");
    env.pg.pgbench(&["-t", "50", "-n", "postgres"]);
    let page = env.backup1("page");
    succeeds(env.validate(&[]), "validate of an intact chain");

    let meta = env.backup_dir(&full).join("backup.json");
    let original = std::fs::read(&meta).unwrap();
    for (what, bytes) in [
        ("checksum mismatch", {
            let mut b = original.clone();
            let at = b.len() / 2;
            b[at] ^= 0x01;
            b
        }),
        ("garbage", b"\x00garbage{".to_vec()),
    ] {
        std::fs::write(&meta, &bytes).unwrap();
        let e = fails_with(
            env.validate(&[]),
            &format!("validate with a FULL whose backup.json is {what}"),
            &[&full, "damaged", &page],
        );
        assert!(e.contains("ORPHAN"), "{what}: {e}");
        assert_eq!(env.status(&page), "ORPHAN", "{what}");
        fails_with(
            env.validate(&["-i", &page]),
            &format!("validate -i PAGE over a FULL whose backup.json is {what}"),
            &[&full],
        );
        // the damaged file is reported, never rewritten
        assert_eq!(std::fs::read(&meta).unwrap(), bytes, "{what}");
    }
    std::fs::write(&meta, &original).unwrap();
    let out = succeeds(env.validate(&[]), "validate after repair");
    assert!(out.contains("validate: OK"), "{out}");
    assert_eq!(env.status(&full), "OK");
    assert_eq!(env.status(&page), "OK");
}

/// A flipped byte in an archived segment inside a backup's start–stop range makes the
/// backup CORRUPT (it cannot reach consistency), naming the segment; the original segment
/// put back makes it OK again.
#[test]
fn validate_checks_wal_to_consistency() {
    let env = Env::new("val-wal-range");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup1("full");
    succeeds(env.validate(&["-i", &full]), "validate of an intact backup");
    let seg = backup_segments(&env, &full)[0];
    let path = env.archive().data_path(&seg);
    let original = std::fs::read(&path).unwrap();
    damage_archived(&path);
    fails_with(
        env.validate(&["-i", &full]),
        "validate with damaged WAL in the backup's range",
        &[&full, &seg.to_string(), "consistency"],
    );
    assert_eq!(env.status(&full), "CORRUPT");
    std::fs::write(&path, &original).unwrap();
    succeeds(env.validate(&[]), "validate with the segment repaired");
    assert_eq!(env.status(&full), "OK");
    // a missing one is as bad
    std::fs::remove_file(&path).unwrap();
    fails_with(
        env.validate(&[]),
        "validate with WAL missing from the backup's range",
        &[&seg.to_string(), "not in the archive"],
    );
    assert_eq!(env.status(&full), "CORRUPT");
}

/// `--wal` reads every segment from the backup to the newest archived one: a missing one
/// is reported as a gap by name, a damaged one by name; a target before them passes.
#[test]
fn validate_wal_reports_gaps_and_damage() {
    let env = Env::new("val-wal-gap");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup1("full");
    let mut segs = Vec::new();
    for _ in 0..4 {
        env.pg.pgbench(&["-t", "50", "-n", "postgres"]);
        segs.push(env.switch_and_wait(&env.pg));
    }
    let out = succeeds(env.validate(&["--wal"]), "validate --wal, nothing missing");
    assert!(out.contains("segments verified"), "{out}");
    let stop: walnut::Lsn = env.row(&full)["stop_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let last_needed = walnut::Lsn(stop.0 - 1).segno(1 << 20);
    let later: Vec<_> = segs
        .iter()
        .filter(|s| s.segno(1 << 20).unwrap() > last_needed + 1)
        .cloned()
        .collect();
    assert!(later.len() >= 2, "{segs:?} after stop {stop}");
    let ar = env.archive();
    // a gap
    let gap = later[0];
    std::fs::remove_file(ar.data_path(&gap)).unwrap();
    succeeds(
        env.validate(&[]),
        "validate without --wal (the gap is after the backup)",
    );
    fails_with(
        env.validate(&["--wal"]),
        "validate --wal over a gap",
        &["gap", &gap.to_string()],
    );
    fails_with(
        env.validate(&["--wal", "-i", &full]),
        "validate --wal -i over a gap",
        &[&gap.to_string()],
    );
    assert_eq!(
        env.status(&full),
        "OK",
        "a gap after the backup leaves it OK"
    );
    // a target before the gap is reachable
    let before_gap = walnut::Lsn(gap.start_lsn(1 << 20).unwrap().0 - 8).to_string();
    succeeds(
        env.validate(&["--wal", "--recovery-target-lsn", &before_gap]),
        "validate --wal to a target before the gap",
    );
    // a time no commit in the archive reaches: recovery would end before it
    let e = fails_with(
        env.validate(&["--wal", "--recovery-target-time", "2999-01-01 00:00:00+00"]),
        "validate --wal to a time beyond the archive",
        &["no commit after the target time"],
    );
    assert!(e.contains(&gap.to_string()), "{e}");
    // a damaged segment after the backup
    let bad = later[1];
    let p = ar.data_path(&bad);
    damage_archived(&p);
    let e = fails_with(
        env.validate(&["--wal"]),
        "validate --wal over a damaged segment",
        &[&bad.to_string(), &gap.to_string()],
    );
    assert!(e.contains("damaged"), "{e}");
    // targets are parsed before anything is read
    let out = env.validate(&["--wal", "--recovery-target-lsn", "nonsense"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nonsense"), "{}", stderr(&out));
}

/// "Could not read" is not "damaged": an unreadable stored directory fails validate but
/// leaves every status as it was, and validate passes once it is readable again. Real damage
/// makes the FULL CORRUPT and its child ORPHAN; the original file put back makes both OK.
#[test]
fn validate_keeps_io_errors_apart_from_damage() {
    let env = Env::new("val-io");
    env.pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    let full = env.backup1("full");
    env.pg.pgbench(&["-t", "50", "-n", "postgres"]);
    let page = env.backup1("page");
    succeeds(env.validate(&[]), "validate of an intact chain");

    // walnut runs as the postgres user, so a mode of 000 denies it the directory.
    let base = env.backup_dir(&full).join("database/base");
    let mode = std::fs::metadata(&base).unwrap().permissions().mode();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o000)).unwrap();
    let e = fails_with(
        env.validate(&[]),
        "validate with an unreadable directory",
        &[&full, "could not", "Permission denied"],
    );
    let e2 = fails_with(
        env.validate(&["-i", &page]),
        "validate -i with an unreadable directory",
        &[&full],
    );
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(mode)).unwrap();
    assert!(
        !e.contains("CORRUPT") && !e2.contains("CORRUPT"),
        "{e}\n{e2}"
    );
    assert_eq!(
        env.status(&full),
        "OK",
        "an I/O error must not mark CORRUPT"
    );
    assert_eq!(env.status(&page), "OK", "an I/O error must not mark ORPHAN");
    succeeds(
        env.validate(&[]),
        "validate with the directory readable again",
    );

    let rel = env.pg.psql(
        "postgres",
        "select pg_relation_filepath('pgbench_accounts')",
    );
    let stored = env.backup_dir(&full).join(format!("database/{rel}"));
    let original = std::fs::read(&stored).unwrap();
    flip_byte(&stored, original.len() / 2);
    fails_with(
        env.validate(&[]),
        "validate with a damaged stored file",
        &[&rel, "checksum"],
    );
    assert_eq!(env.status(&full), "CORRUPT");
    assert_eq!(env.status(&page), "ORPHAN");
    std::fs::write(&stored, &original).unwrap();
    let out = succeeds(env.validate(&[]), "validate with the original file back");
    assert!(out.contains("CORRUPT -> OK"), "{out}");
    assert_eq!(env.status(&full), "OK");
    assert_eq!(env.status(&page), "OK");
}

/// A stored file replaced by a symlink (to a file the attacker wants measured) is refused as
/// damage: never followed, and its size and CRC are recorded nowhere.
#[test]
fn validate_refuses_linked_stored_files() {
    let env = Env::new("val-link");
    env.pg.psql(
        "postgres",
        "create table t as select g from generate_series(1, 1000) g",
    );
    let full = env.backup1("full");
    let secret = env.dir.path().join("secret");
    let body: Vec<u8> = (0..12_345u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&secret, &body).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let crc = format!("{:08x}", crc32c::crc32c(&body));

    let stored = env.backup_dir(&full).join("database/PG_VERSION");
    std::fs::remove_file(&stored).unwrap();
    std::os::unix::fs::symlink(&secret, &stored).unwrap();
    let out = env.validate(&[]);
    let text = format!("{}{}", stdout(&out), stderr(&out));
    fails_with(
        out,
        "validate with a linked stored file",
        &["symbolic link"],
    );
    assert_eq!(env.status(&full), "CORRUPT");
    let meta = std::fs::read_to_string(env.backup_dir(&full).join("backup.json")).unwrap();
    for leak in [crc.as_str(), "12345 bytes"] {
        assert!(!meta.contains(leak), "backup.json records {leak}: {meta}");
        assert!(!text.contains(leak), "output shows {leak}: {text}");
    }
}
