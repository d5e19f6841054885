//! Helpers shared by the lifecycle tests: restores from any catalog, catalog listings and
//! copies, segment names.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use super::env::*;
use super::harness::*;

pub(crate) fn json(out: Output, what: &str) -> serde_json::Value {
    serde_json::from_str(&ok(out, what)).expect(what)
}

/// `walnut ARGS` as the cluster owner with extra environment variables.
pub(crate) fn walnut_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

/// The rows of `show --format json` of catalog `cat`.
pub(crate) fn show(cat: &Path) -> Vec<serde_json::Value> {
    json(
        walnut(&[
            "show",
            "-B",
            cat.to_str().unwrap(),
            "--instance",
            "db",
            "--format",
            "json",
        ]),
        "show",
    )
    .as_array()
    .unwrap()
    .clone()
}

/// (id, status) of every backup of catalog `cat`.
pub(crate) fn statuses(cat: &Path) -> Vec<(String, String)> {
    show(cat)
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Restores backup `id` of catalog `cat` into `env`'s directory `name` with the recovery
/// arguments `target` (a restore point name, "immediate" or "latest"), starts it, waits
/// until it paused at the target (or was promoted, for latest) and returns its dump; the
/// server is stopped and its directory removed.
pub(crate) fn restore_dump(env: &Env, cat: &Path, id: &str, target: &str, name: &str) -> String {
    let dir = env.path(name);
    let mut args = vec![
        "restore",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "-D",
        dir.to_str().unwrap(),
        "-j",
        "2",
        "-i",
        id,
    ];
    let latest = target == "latest";
    match target {
        "latest" => {}
        "immediate" => args.extend(["--recovery-target", "immediate"]),
        n => args.extend(["--recovery-target-name", n]),
    }
    ok(walnut(&args), &format!("restore {id} to {target}"));
    let sock = pg_mkdir(&env.path(&format!("{name}-sock")));
    let mut r = env.pg.existing_like(&dir, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    if latest {
        wait_promoted(&r);
    } else {
        wait_paused(&r);
    }
    let d = Env::dumpall(&r);
    r.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&sock);
    d
}

/// Every regular file below `root` (relative paths), skipping lock files (names starting
/// with '.').
pub(crate) fn files(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_str().unwrap().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// Bytes of the files below `root`.
pub(crate) fn disk_use(root: &Path) -> u64 {
    files(root)
        .iter()
        .map(|f| std::fs::metadata(root.join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// A copy of catalog `from` at `to` (owned by the cluster owner).
pub(crate) fn copy_catalog(from: &Path, to: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(to);
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
    chown_pg(to);
    to.to_path_buf()
}

/// Copies the files `names` (relative) from catalog `from` into catalog `to`.
pub(crate) fn copy_files(from: &Path, to: &Path, names: &BTreeSet<String>) {
    for n in names {
        let dst = to.join(n);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(from.join(n), &dst).unwrap();
    }
    chown_pg(to);
}

/// "X/Y" as a number.
pub(crate) fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// (timeline, segment number) of an archive object name with 1 MiB segments, if it names
/// a segment's object.
pub(crate) fn seg_of(name: &str) -> Option<(u32, u64)> {
    let h = name.get(0..24)?;
    if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&h[0..8], 16).ok()?;
    let log = u64::from_str_radix(&h[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&h[16..24], 16).ok()?;
    Some((tli, (log << 12) + seg))
}

/// The segment holding LSN `l` (1 MiB segments); for a stop LSN the segment holding the
/// byte before it.
pub(crate) fn seg(l: u64) -> u64 {
    l >> 20
}

/// `walnut merge -i ID` on catalog `cat` (default jobs), with a JSON report.
pub(crate) fn merge(cat: &str, id: &str) -> Output {
    walnut(&[
        "merge",
        "-B",
        cat,
        "--instance",
        "db",
        "-i",
        id,
        "--format",
        "json",
    ])
}

/// `delete` arguments: redundancy 1 with the WAL purge, a JSON report.
pub(super) const EXPIRE_REDUNDANCY_1_JSON: &[&str] = &[
    "--expired",
    "--retention-redundancy",
    "1",
    "--delete-wal",
    "--format",
    "json",
];
