//! The append-only catalog: archive, FULL, PAGE, DELTA, validate and restore against a store
//! that refuses deletes (`WALNUT_TEST_REFUSE_DELETE`, as a WORM / Object Lock bucket), with
//! an oracle nobody here wrote: after every step, every file the catalog held before is
//! still there with the same inode, size, mtime and bytes. Only lock files and temp files
//! (dot-names, `.tmp/`) may change.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;

use super::env::*;
use super::harness::*;

const REFUSE: &str = "WALNUT_TEST_REFUSE_DELETE";

/// Watches the catalog with inotify while the test runs and records every delete, rename
/// over an existing name and in-place write of a stored object (anything named with a
/// leading dot, or inside `.tmp/`, is the store's own scratch and exempt). Catches what a
/// before/after comparison cannot: a file rewritten and settled within one command.
struct Watcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Watcher {
    fn start(cat: &Path) -> Watcher {
        use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};
        use std::collections::{HashMap, HashSet};
        let ino = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let flags = F::IN_CREATE
            | F::IN_DELETE
            | F::IN_MOVED_TO
            | F::IN_MOVED_FROM
            | F::IN_MODIFY
            | F::IN_ONLYDIR;
        let mut dirs = HashMap::new();
        let mut names: HashSet<std::path::PathBuf> = HashSet::new();
        // Names seen by a directory scan of a directory created while watching: its
        // files may also arrive as creation events (created between the watch and the
        // scan), so the first such event is not a replacement.
        let mut scanned: HashSet<std::path::PathBuf> = HashSet::new();
        fn add(
            ino: &Inotify,
            flags: F,
            d: &Path,
            dirs: &mut HashMap<nix::sys::inotify::WatchDescriptor, std::path::PathBuf>,
            names: &mut HashSet<std::path::PathBuf>,
        ) {
            if let Ok(wd) = ino.add_watch(d, flags) {
                dirs.insert(wd, d.to_path_buf());
            }
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    add(ino, flags, &p, dirs, names);
                } else {
                    names.insert(p);
                }
            }
        }
        add(&ino, flags, cat, &mut dirs, &mut names);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut bad = Vec::new();
            let scratch = |p: &Path| {
                p.components()
                    .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            };
            loop {
                let done = stop2.load(std::sync::atomic::Ordering::SeqCst);
                let evs = ino.read_events().unwrap_or_default();
                for ev in &evs {
                    let (Some(dir), Some(name)) = (dirs.get(&ev.wd).cloned(), &ev.name) else {
                        continue;
                    };
                    let p = dir.join(name);
                    if scratch(&p) {
                        continue;
                    }
                    let m = ev.mask;
                    if m.contains(F::IN_ISDIR) {
                        if m.contains(F::IN_CREATE) || m.contains(F::IN_MOVED_TO) {
                            add(&ino, flags, &p, &mut dirs, &mut scanned);
                        } else if m.contains(F::IN_DELETE) || m.contains(F::IN_MOVED_FROM) {
                            bad.push(format!("directory removed: {}", p.display()));
                        }
                    } else if m.contains(F::IN_DELETE) || m.contains(F::IN_MOVED_FROM) {
                        bad.push(format!("removed: {}", p.display()));
                    } else if m.contains(F::IN_MOVED_TO) || m.contains(F::IN_CREATE) {
                        if !names.insert(p.clone()) && !scanned.remove(&p) {
                            bad.push(format!("replaced: {}", p.display()));
                        }
                        scanned.remove(&p);
                    } else if m.contains(F::IN_MODIFY) {
                        bad.push(format!("written in place: {}", p.display()));
                    }
                }
                if done && evs.is_empty() {
                    return bad;
                }
                if evs.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; returns what was rewritten or deleted.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    crc: u32,
}

/// Every stored object of the catalog (regular files whose path has no dot-named
/// component), with what must never change.
fn snapshot(cat: &Path) -> BTreeMap<String, Seen> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Seen>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                walk(root, &e.path(), out);
            } else {
                let bytes = std::fs::read(e.path()).unwrap();
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    rel,
                    Seen {
                        ino: md.ino(),
                        size: md.size(),
                        mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                        crc: crc32c::crc32c(&bytes),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(cat, cat, &mut out);
    out
}

/// Asserts nothing in `before` was removed or rewritten; returns the new snapshot.
fn nothing_rewritten(
    cat: &Path,
    before: &BTreeMap<String, Seen>,
    step: &str,
) -> BTreeMap<String, Seen> {
    let now = snapshot(cat);
    for (k, v) in before {
        match now.get(k) {
            None => panic!("{step}: {k} was removed from the catalog"),
            Some(n) => assert_eq!(n, v, "{step}: {k} was rewritten"),
        }
    }
    assert!(
        now.len() >= before.len(),
        "{step}: catalog shrank ({} -> {})",
        before.len(),
        now.len()
    );
    now
}

fn worm(args: &[&str]) -> Output {
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(args).env(REFUSE, "1");
    run(&mut c)
}

#[test]
fn archive_backups_validate_and_restore_never_rewrite_or_delete() {
    // The archive_command runs with the store refusing deletes too (a later line in
    // postgresql.conf wins).
    let env = Env::with("append-only", &["-k"], "");
    env.pg.append_conf(&format!(
        "archive_command = 'env {REFUSE}=1 {} -B {} --instance db %p %f'",
        walnut_bin("walnut-archive").display(),
        env.cat()
    ));
    env.pg.psql("postgres", "select pg_reload_conf()");
    let watch = Watcher::start(&env.cat);
    env.pg.pgbench(&["-i", "-s", "2", "postgres"]);
    env.switch_and_wait(&env.pg);
    let mut seen = nothing_rewritten(&env.cat, &snapshot(&env.cat), "archive");

    let backup = |mode: &str, seen: &mut BTreeMap<String, Seen>| -> String {
        let mut a = env.backup_args_on(&env.pg, mode, &["-j", "2", "--compress", "lz4"]);
        a.insert(0, String::new());
        let a: Vec<&str> = a.iter().skip(1).map(String::as_str).collect();
        let id = ok(worm(&a), &format!("{mode} backup")).trim().to_string();
        *seen = nothing_rewritten(&env.cat, seen, &format!("{mode} backup"));
        id
    };
    let full = backup("full", &mut seen);
    env.pg.pgbench(&["-t", "300", "-c", "2", "postgres"]);
    env.switch_and_wait(&env.pg);
    seen = nothing_rewritten(&env.cat, &seen, "archive after FULL");
    let page = backup("page", &mut seen);
    env.pg.pgbench(&["-t", "300", "-c", "2", "postgres"]);
    let delta = backup("delta", &mut seen);
    let want = Env::dumpall(&env.pg);
    env.switch_and_wait(&env.pg);
    seen = nothing_rewritten(&env.cat, &seen, "archive after DELTA");

    // validate every backup, and the archive: verdicts are new records, never rewrites.
    for id in [&full, &page, &delta] {
        ok(
            worm(&["validate", "-B", env.cat(), "--instance", "db", "-i", id]),
            "validate",
        );
        seen = nothing_rewritten(&env.cat, &seen, &format!("validate {id}"));
    }
    ok(
        worm(&["validate", "-B", env.cat(), "--instance", "db", "--wal"]),
        "validate --wal",
    );
    seen = nothing_rewritten(&env.cat, &seen, "validate --wal");
    for id in [&full, &page, &delta] {
        assert_eq!(env.status(id), "OK", "{id}");
    }

    // restore the DELTA chain to its end and compare with the primary at that moment.
    let target = env.path("restored");
    ok(
        worm(&[
            "restore",
            "-B",
            env.cat(),
            "--instance",
            "db",
            "-i",
            &delta,
            "-D",
            target.to_str().unwrap(),
            "--recovery-target",
            "immediate",
            "-j",
            "2",
        ]),
        "restore",
    );
    nothing_rewritten(&env.cat, &seen, "restore");
    let bad = watch.finish();
    assert!(
        bad.is_empty(),
        "the catalog was rewritten or shrunk:\n{}",
        bad.join("\n")
    );
    let sock = pg_mkdir(&env.path("restored-sock"));
    let mut r = env.pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_promoted_or_paused(&r);
    same_dump(&Env::dumpall(&r), &want, "restored DELTA chain");
    r.stop();
}

/// Recovery to `immediate` ends paused (pause is the default action) or promoted.
fn wait_promoted_or_paused(pg: &Pg) {
    let t0 = std::time::Instant::now();
    loop {
        let s = pg.psql(
            "postgres",
            "select case when not pg_is_in_recovery() then 'done' else pg_get_wal_replay_pause_state() end",
        );
        if s == "done" || s == "paused" {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "recovery did not reach its target: {s}\n{}",
            pg.server_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
