//! The WAL archive is append-only: no stored object is ever rewritten (a pending index is
//! completed by a new object), and the look-ahead and prefetch spools are local working
//! state on the PostgreSQL host (`--spool-dir`), never catalog content.
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::archive::{fname, push, wait_for};
use super::harness::*;

/// Segments of a cluster whose WAL runs across segment boundaries (records continue from
/// one segment into the next, so a segment pushed alone indexes as pending).
pub(crate) fn crossing_segments(dir: &Path) -> (Pg, Vec<PathBuf>) {
    let mut pg = Pg::init(&pg_bin(), dir, "ao", &["--wal-segsize=1"]);
    pg.append_conf("wal_keep_size = '1GB'");
    pg.start();
    pg.psql("postgres", "create table t(i int, s text)");
    pg.psql(
        "postgres",
        "insert into t select g, md5(g::text) from generate_series(1, 60000) g",
    );
    pg.psql("postgres", "select pg_switch_wal()");
    let current = pg.psql("postgres", "select pg_walfile_name(pg_current_wal_lsn())");
    pg.stop();
    let segs = pg_mkdir(&dir.join("ao-segs"));
    let mut names: Vec<String> = std::fs::read_dir(pg.data.join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() < current.as_str())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        // each in a directory of its own: no sibling to complete a crossing record from
        let d = pg_mkdir(&segs.join(&n[16..]));
        std::fs::copy(pg.data.join("pg_wal").join(&n), d.join(&n)).unwrap();
        out.push(d.join(&n));
    }
    chown_pg(&segs);
    (pg, out)
}

/// Every file of the timeline directory: name → (inode, bytes).
fn snapshot(tli_dir: &Path) -> BTreeMap<String, (u64, Vec<u8>)> {
    std::fs::read_dir(tli_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let ino = e.metadata().unwrap().ino();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, (ino, std::fs::read(e.path()).unwrap()))
        })
        .collect()
}

#[test]
fn archived_objects_are_never_rewritten_and_pending_indexes_are_completed_beside() {
    let dir = pg_tempdir("ao-append");
    let (pg, segs) = crossing_segments(dir.path());
    assert!(segs.len() >= 4, "only {} segments", segs.len());
    let cat = catalog_for(dir.path(), &pg);
    let tli = cat.join("instances/db/wal/00000001");
    let mut seen: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
    for s in &segs {
        ok(push(&cat, s, &fname(s), &["--look-ahead", "0"]), "push");
        let now = snapshot(&tli);
        for (name, (ino, bytes)) in &seen {
            let (ino2, bytes2) = now.get(name).unwrap_or_else(|| panic!("{name} removed"));
            assert_eq!(ino, ino2, "{name} was replaced");
            assert!(bytes == bytes2, "{name} was rewritten");
        }
        seen = now;
    }
    // records crossed boundaries: pending indexes were stored, and each one whose next
    // segment arrived was completed by a new .idx beside it
    let pending: Vec<&String> = seen
        .keys()
        .filter(|n| n.ends_with(".idx-pending"))
        .collect();
    assert!(!pending.is_empty(), "no pending index: {:?}", seen.keys());
    let ar =
        walnut::archive::WalArchive::open(&walnut::catalog::Catalog::open(&cat).unwrap(), "db")
            .unwrap();
    let last = fname(segs.last().unwrap());
    for s in &segs {
        let n: walnut::WalFileName = fname(s).parse().unwrap();
        let st = ar.index_state(1, n.segno(1 << 20).unwrap()).unwrap();
        if fname(s) == last {
            continue;
        }
        assert!(
            matches!(st, walnut::archive::IndexState::Indexed(_)),
            "{n}: {st:?}"
        );
    }
    for p in pending {
        let stem = p.strip_suffix(".idx-pending").unwrap();
        if stem != last {
            assert!(
                seen.contains_key(&format!("{stem}.idx")),
                "{stem} not completed"
            );
        }
    }
}

/// A pg_wal with every segment `.ready`.
fn ready_pg_wal(dir: &Path, segs: &[PathBuf]) -> PathBuf {
    let pg_wal = pg_mkdir(&dir.join("pgd/pg_wal"));
    let status = pg_mkdir(&pg_wal.join("archive_status"));
    for s in segs {
        std::fs::copy(s, pg_wal.join(fname(s))).unwrap();
        std::fs::write(status.join(format!("{}.ready", fname(s))), "").unwrap();
    }
    chown_pg(&pg_wal);
    pg_wal
}

#[test]
fn spools_are_local_and_follow_spool_dir() {
    let dir = pg_tempdir("ao-spool");
    let (pg, segs) = super::archive::make_segments(dir.path(), "sp", 5);
    let cat = catalog_for(dir.path(), &pg);
    let pg_wal = ready_pg_wal(dir.path(), &segs);
    let names: Vec<String> = segs.iter().map(|s| fname(s)).collect();
    let spool = pg_mkdir(&dir.path().join("local")).join("push-spool");
    ok(
        push(
            &cat,
            &pg_wal.join(&names[0]),
            &names[0],
            &["--look-ahead", "2", "--spool-dir", spool.to_str().unwrap()],
        ),
        "push with --spool-dir",
    );
    for n in &names[1..=2] {
        assert!(
            wait_for(&spool.join(format!("{n}.ok")), 30),
            "{n} not acknowledged in --spool-dir"
        );
    }
    assert!(!pg_wal.join("walnut-spool").exists());
    assert!(!cat.join("instances/db/spool").exists());
    // the acknowledgement is taken from there
    ok(
        push(
            &cat,
            &pg_wal.join(&names[1]),
            &names[1],
            &["--look-ahead", "0", "--spool-dir", spool.to_str().unwrap()],
        ),
        "acknowledged push",
    );
    assert!(!spool.join(format!("{}.ok", names[1])).exists());

    // walnut-fetch's prefetch spool
    let rec = pg_mkdir(&dir.path().join("rec/pg_wal"));
    let dest = rec.join("RECOVERYXLOG");
    let pf = dir.path().join("local/prefetch");
    let fetch = |extra: &[&str], n: Option<&str>| {
        let mut c = as_pg(walnut_bin("walnut-fetch"));
        c.arg("-B")
            .arg(&cat)
            .args(["--instance", "db", "--spool-dir"])
            .arg(&pf)
            .args(extra);
        if let Some(n) = n {
            c.arg(n).arg(&dest);
        }
        run(&mut c)
    };
    ok(fetch(&["--prefetch", "2"], Some(&names[0])), "fetch");
    assert!(
        wait_for(&pf.join(format!("{}.json", names[2])), 30),
        "prefetch into --spool-dir did not run"
    );
    assert!(!rec.join("walnut-prefetch").exists());
    ok(
        fetch(&["--prefetch", "0"], Some(&names[1])),
        "fetch from spool",
    );
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&segs[1]).unwrap());
    ok(fetch(&["--cleanup"], None), "cleanup");
    assert!(!pf.exists(), "--cleanup left the spool");
}
