//! `walnut merge` checks every source it reads against its stored checksum before the merged
//! FULL may be committed: a damaged byte in the FULL's or the PAGE's copy of a large file
//! (rebuilt while a writer thread stores it) or of a small one makes the merge fail with
//! an error naming the file, and the chain stays as it was, every backup of it OK, with
//! nothing merged listed OK. The undamaged catalog then merges.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::env::*;
use super::harness::*;
use super::lifecycle_util::merge;

fn copy_catalog(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Flips one byte of `path` at `at` (a fraction of its length).
fn flip(path: &Path, at: f64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    let off = ((len as f64 * at) as u64).min(len - 1);
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&b).unwrap();
}

/// (id, mode, status) of every listed backup.
fn rows(cat: &str) -> Vec<(String, String, String)> {
    let out = ok(
        walnut(&["show", "-B", cat, "--instance", "db", "--format", "json"]),
        "show",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["mode"].as_str().unwrap().to_string(),
                b["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn merge_of_a_damaged_source_commits_nothing() {
    let env = Env::new("life-merge-damage");
    let pg = &env.pg;
    // scale 2: pgbench_accounts is 26 MB, rebuilt with a writer thread; pgbench_branches
    // is one page
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let rel = |t: &str| {
        pg.psql("postgres", &format!("select pg_relation_filepath('{t}')"))
            .trim()
            .to_string()
    };
    let (accounts, branches) = (rel("pgbench_accounts"), rel("pgbench_branches"));
    let f = env.backup("full", &[]);
    pg.pgbench(&["-t", "500", "-n", "postgres"]);
    let p = env.backup("page", &[]);
    env.switch_and_wait(pg);
    let pristine = env.path("pristine");
    copy_catalog(&env.cat, &pristine);
    let bdir = |cat: &Path, id: &str| cat.join("instances/db/backups").join(id).join("database");
    let full_acc = bdir(&pristine, &f).join(&accounts);
    let page_acc = bdir(&pristine, &p).join(format!("{accounts}.winc"));
    let page_br = bdir(&pristine, &p).join(format!("{branches}.winc"));
    for path in [&full_acc, &page_acc, &page_br] {
        assert!(path.is_file(), "{} is not stored", path.display());
    }
    assert!(std::fs::metadata(&full_acc).unwrap().len() > 16 << 20);

    let work = env.path("work");
    let w = work.to_str().unwrap().to_string();
    let cases = [
        (
            "the FULL's copy of a large file",
            full_acc.clone(),
            0.6,
            accounts.clone(),
        ),
        (
            "the PAGE's copy of a large file",
            page_acc.clone(),
            0.5,
            accounts.clone(),
        ),
        (
            "the PAGE's copy of a small file",
            page_br.clone(),
            0.6,
            branches.clone(),
        ),
    ];
    for (what, path, at, rel) in cases {
        copy_catalog(&pristine, &work);
        flip(&work.join(path.strip_prefix(&pristine).unwrap()), at);
        let e = fails_with(
            merge(&w, &p),
            &format!("merge with damage in {what}"),
            &[&rel],
        );
        assert!(
            e.contains("checksum") || e.contains("corrupt") || e.contains("out of order"),
            "{what}: {e}"
        );
        let listed = rows(&w);
        for id in [&f, &p] {
            assert!(
                listed.iter().any(|(i, _, s)| i == id && s == "OK"),
                "{what}: backup {id} should still be OK: {listed:?}"
            );
        }
        let ok_rows = listed.iter().filter(|(_, _, s)| s == "OK").count();
        assert_eq!(ok_rows, 2, "{what}: nothing merged may read OK: {listed:?}");
    }

    // undamaged: one FULL replaces the chain
    copy_catalog(&pristine, &work);
    ok(merge(&w, &p), "merge of the undamaged chain");
    let listed = rows(&w);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].1.as_str(), listed[0].2.as_str()), ("FULL", "OK"));
}
