//! A walnut-archive SIGKILLed on the last push (while it completes the previous segment's
//! pending index, stores its own index or its segment) leaves nothing behind once
//! PostgreSQL's repeated push of that segment succeeds: no temp file in the catalog, every
//! segment's index complete (the newest may be pending). The kill is placed by name
//! (`WALNUT_TEST_KILL_BEFORE`, see `walnut::lifecycle::crashpoint`), not by timing.
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use walnut::archive::{IndexState, WalArchive};

use super::archive::{fname, push, show_json, temp_files};
use super::archive_append_only::crossing_segments;
use super::harness::*;

/// Pushes `seg` with a kill armed before the first catalog write whose name contains
/// `before`.
fn push_killed(cat: &Path, seg: &Path, before: &str) -> Output {
    let mut c = as_pg(walnut_bin("walnut-archive"));
    c.arg("-B")
        .arg(cat)
        .args(["--instance", "db", "--look-ahead", "0"])
        .arg(seg)
        .arg(fname(seg))
        .env("WALNUT_TEST_KILL_BEFORE", before);
    run(&mut c)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn was_killed(o: &Output) -> bool {
    // runuser reports its child's SIGKILL as 128 + 9
    o.status.signal() == Some(9) || o.status.code() == Some(137)
}

fn state(cat: &Path, seg: &Path) -> IndexState {
    let ar = WalArchive::open(&walnut::catalog::Catalog::open(cat).unwrap(), "db").unwrap();
    let n: walnut::WalFileName = fname(seg).parse().unwrap();
    ar.index_state(1, n.segno(1 << 20).unwrap()).unwrap()
}

/// After the repeated push of `pushed.last()`: no temp file, every earlier segment indexed
/// completely, the last one indexed or pending, and `show --archive --verify` clean.
fn check_healed(cat: &Path, pushed: &[PathBuf], what: &str) {
    let temps = temp_files(cat, "00000001");
    assert!(temps.is_empty(), "{what}: temp files left: {temps:?}");
    let (last, earlier) = pushed.split_last().unwrap();
    for s in earlier {
        let st = state(cat, s);
        assert!(
            matches!(st, IndexState::Indexed(_)),
            "{what}: {}: {st:?}",
            fname(s)
        );
    }
    let st = state(cat, last);
    assert!(
        matches!(st, IndexState::Indexed(_) | IndexState::Pending(_)),
        "{what}: {}: {st:?}",
        fname(last)
    );
    let (clean, report) = show_json(cat, true);
    assert!(clean, "{what}: {report}");
    let t = &report["timelines"][0];
    assert_eq!(t["index_missing"].as_array().unwrap().len(), 0, "{report}");
    assert!(t["pending"].as_u64().unwrap() <= 1, "{report}");
}

#[test]
fn a_killed_last_push_is_healed_by_its_repeat() {
    let dir = pg_tempdir("arch-heal");
    let (pg, segs) = crossing_segments(dir.path());
    let cat = catalog_for(dir.path(), &pg);
    // push until a segment's index is pending (its last record continues into the next,
    // which is not archived yet); three more segments are needed after it
    let mut n = 0;
    loop {
        assert!(
            n + 3 < segs.len(),
            "no pending index among {} segments",
            segs.len()
        );
        ok(
            push(&cat, &segs[n], &fname(&segs[n]), &["--look-ahead", "0"]),
            "push",
        );
        n += 1;
        if matches!(state(&cat, &segs[n - 1]), IndexState::Pending(_)) {
            break;
        }
    }
    let tli = "instances/db/wal/00000001";
    // 1. killed while completing the previous segment's pending index: its temp file
    // written, not yet linked (the own index of the segment may or may not be stored: the
    // two run in parallel)
    let prev = &segs[n - 1];
    let seg = &segs[n];
    let out = push_killed(&cat, seg, &format!("put {tli}/{}.idx", fname(prev)));
    assert!(
        was_killed(&out),
        "not killed: {}\n{}",
        out.status,
        stderr(&out)
    );
    let temps = temp_files(&cat, "00000001");
    assert!(
        temps
            .iter()
            .any(|t| t.starts_with(&format!(".{}.idx.walnut-tmp.", fname(prev)))),
        "the kill left no temp file of {}'s index: {temps:?}",
        fname(prev)
    );
    assert!(matches!(state(&cat, prev), IndexState::Pending(_)));
    ok(
        push(&cat, seg, &fname(seg), &["--look-ahead", "0"]),
        "repeated push",
    );
    check_healed(&cat, &segs[..=n], "killed completing the previous index");

    // 2. killed while storing its own index (pending or complete), then 3. while
    // committing the segment itself: each the last push, each healed by the repeat
    for (k, point) in [(n + 1, ".idx"), (n + 2, ".lz4")] {
        let seg = &segs[k];
        let out = push_killed(&cat, seg, &format!("{tli}/{}{point}", fname(seg)));
        assert!(
            was_killed(&out),
            "{point}: not killed: {}\n{}",
            out.status,
            stderr(&out)
        );
        assert!(
            !temp_files(&cat, "00000001").is_empty(),
            "{point}: the kill left no temp file"
        );
        ok(
            push(&cat, seg, &fname(seg), &["--look-ahead", "0"]),
            "repeated push",
        );
        check_healed(&cat, &segs[..=k], point);
    }
    // the rest archives and indexes as usual
    for s in &segs[n + 3..] {
        ok(push(&cat, s, &fname(s), &["--look-ahead", "0"]), "push");
    }
    check_healed(&cat, &segs, "all pushed");
}
