//! A catalog written by the release before the append-only catalog (issue 9) stays
//! readable: `tests/fixtures/catalog-v2.tar.gz` (made by `make-catalog-v2.sh`; see the
//! README there) holds a FULL backup with lz4, a PAGE backup on it and their WAL up to the
//! restore point `fixture_rp`. Today's walnut shows, validates and restores both, and the
//! restored servers hold the rows the fixture wrote; the old backup.json files are never
//! rewritten.
use std::path::{Path, PathBuf};
use std::process::Command;

use super::env::*;
use super::harness::*;

const FULL: &str = "TPA9MC";
const PAGE: &str = "TPA9MD";

fn unpack(dir: &Path) -> PathBuf {
    let tarball = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog-v2.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir),
    );
    chown_pg(&dir.join("cat"));
    dir.join("cat")
}

fn meta(cat: &Path, id: &str) -> Vec<u8> {
    std::fs::read(cat.join(format!("instances/db/backups/{id}/backup.json"))).unwrap()
}

/// Restores `id` to `target` with `extra` recovery options, starts it and waits until it
/// has been promoted.
fn restore_and_count(
    dir: &Path,
    cat: &Path,
    id: &str,
    name: &str,
    extra: &[&str],
) -> (String, String) {
    let target = dir.join(name);
    let mut args = vec![
        "restore",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "-i",
        id,
        "-D",
        target.to_str().unwrap(),
        "--recovery-target-action",
        "promote",
    ];
    args.extend_from_slice(extra);
    ok(walnut(&args), &format!("restore {id}"));
    let sock = pg_mkdir(&dir.join(format!("{name}-sock")));
    let mut pg = Pg::existing(&pg_bin(), &target, &sock);
    pg.append_conf("archive_mode = off");
    pg.start();
    wait_promoted(&pg);
    let n = pg.psql("postgres", "select count(*) from t");
    let upd = pg.psql("postgres", "select count(*) from t where s = 'upd'");
    pg.stop();
    (n, upd)
}

#[test]
fn previous_release_catalog_shows_validates_and_restores() {
    let dir = pg_tempdir("compat");
    let cat = unpack(dir.path());
    let c = cat.to_str().unwrap();
    let before = (meta(&cat, FULL), meta(&cat, PAGE));

    let out = ok(
        walnut(&["show", "-B", c, "--instance", "db", "--format", "json"]),
        "show json",
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    for (id, mode, compress) in [(FULL, "FULL", "lz4"), (PAGE, "PAGE", "none")] {
        let b = rows.iter().find(|b| b["id"] == id).expect(id);
        assert_eq!(b["mode"], mode, "{b}");
        assert_eq!(b["status"], "OK", "{b}");
        assert_eq!(b["compress"], compress, "{b}");
    }
    let text = ok(walnut(&["show", "-B", c, "--instance", "db"]), "show text");
    assert!(
        text.contains(FULL) && text.contains(PAGE) && text.contains("OK"),
        "{text}"
    );

    ok(
        walnut(&["validate", "-B", c, "--instance", "db"]),
        "validate",
    );
    let rows = ok(
        walnut(&["show", "-B", c, "--instance", "db", "--format", "json"]),
        "show json after validate",
    );
    assert_eq!(rows.matches("\"OK\"").count(), 2, "{rows}");

    let (n, upd) = restore_and_count(
        dir.path(),
        &cat,
        FULL,
        "r-full",
        &["--recovery-target", "immediate"],
    );
    assert_eq!((n.as_str(), upd.as_str()), ("1000", "0"));
    let (n, upd) = restore_and_count(
        dir.path(),
        &cat,
        PAGE,
        "r-page",
        &["--recovery-target-name", "fixture_rp"],
    );
    assert_eq!((n.as_str(), upd.as_str()), ("2500", "10"));

    // nothing the previous release wrote was rewritten
    assert_eq!((meta(&cat, FULL), meta(&cat, PAGE)), before);
}
