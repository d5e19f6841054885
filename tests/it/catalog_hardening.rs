//! The catalog is untrusted input (issue 8 §3, backup-catalog side): hostile manifests,
//! stored files and backup directories behind symlinks, a `backup.json` whose id points
//! elsewhere and a damaged catalog marker, against a real backup of a real PostgreSQL 15
//! cluster. Every case puts sentinels beside the restore target and the catalog and checks
//! that nothing outside the target and the catalog changed (content, mode, kind).
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use walnut::backup::meta;
use walnut::format::manifest::{FileEntry, ManifestWriter, Storage};

use super::env::{stderr, Env as Cluster};
use super::harness::*;

/// What a tree looks like: per path, its kind, mode and content (or link target).
type Snapshot = BTreeMap<PathBuf, (char, u32, Vec<u8>)>;

fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let mode = md.permissions().mode();
        let entry = if md.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            ('l', mode, t.into_os_string().into_encoded_bytes())
        } else if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ('d', mode, Vec::new())
        } else {
            ('f', mode, std::fs::read(&p).unwrap())
        };
        out.insert(p, entry);
    }
    out
}

/// Files (not directories) below `dir`, if it exists.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    snapshot(dir)
        .into_iter()
        .filter(|(_, (k, _, _))| *k != 'd')
        .map(|(p, _)| p)
        .collect()
}

/// A cluster archiving into a catalog, with one FULL backup, stopped; sentinels in
/// `outside/` (beside the restore targets and the catalog).
struct Env {
    // Fields drop in order: the server must stop before its directory is removed.
    base: Cluster,
    id: String,
    outside: PathBuf,
    /// A sentinel file whose size and CRC must never end up in the catalog.
    secret: Vec<u8>,
}

impl std::ops::Deref for Env {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.base
    }
}

impl Env {
    fn new() -> Env {
        let mut base = Cluster::new("cat-hard");
        base.pg.psql(
            "postgres",
            "create table t(i int); insert into t select generate_series(1, 1000)",
        );
        let id = base.backup1("full");
        base.pg.stop();
        let dir = base.dir.path();

        let outside = dir.join("outside");
        std::fs::create_dir_all(outside.join("victim-dir")).unwrap();
        std::fs::write(outside.join("sentinel"), b"do not touch\n").unwrap();
        let secret: Vec<u8> = (0..12_345u32).map(|i| (i * 31 % 253) as u8).collect();
        std::fs::write(outside.join("secret"), &secret).unwrap();
        chown_pg(&outside);
        std::fs::set_permissions(outside.join("victim-dir"), PermissionsExt::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(outside.join("sentinel"), PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::set_permissions(outside.join("secret"), PermissionsExt::from_mode(0o600)).unwrap();
        // and one right beside the catalog
        std::fs::write(dir.join("beside-catalog"), b"sentinel\n").unwrap();
        chown_pg(&dir.join("beside-catalog"));
        Env {
            base,
            id,
            outside,
            secret,
        }
    }

    fn bdir(&self) -> PathBuf {
        self.backup_dir(&self.id)
    }

    /// Everything in the temp dir that is neither the catalog, a restore target, nor the
    /// (stopped) primary's files.
    fn outside_state(&self) -> Snapshot {
        let mut s = snapshot(&self.outside);
        s.extend(snapshot(&self.dir.path().join("beside-catalog")));
        s
    }

    fn restore(&self, target: &Path) -> Output {
        walnut(&[
            "restore",
            "-B",
            self.cat(),
            "--instance",
            "db",
            "-i",
            &self.id,
            "-D",
            target.to_str().unwrap(),
        ])
    }

    fn validate(&self, id: Option<&str>) -> Output {
        match id {
            Some(id) => self.base.validate(&["-i", id]),
            None => self.base.validate(&[]),
        }
    }

    /// Writes the backup's manifest with these entries (a valid manifest: right count and
    /// CRC), as someone who can write the catalog could.
    fn write_manifest(&self, entries: &[FileEntry]) {
        let mut w = ManifestWriter::new(Vec::new(), false).unwrap();
        for e in entries {
            w.add(e).unwrap();
        }
        std::fs::write(self.bdir().join("manifest"), w.finish().unwrap()).unwrap();
    }

    /// Puts a file into the catalog (owned by the cluster owner, as the catalog is).
    fn plant(&self, path: &Path, data: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
        chown_pg(path);
    }
}

fn file_entry(path: String, data: &[u8]) -> FileEntry {
    FileEntry {
        path,
        storage: Storage::Full,
        size: data.len() as u64,
        stored_size: data.len() as u64,
        crc32c: crc32c::crc32c(data),
        changed_blocks: None,
        file_blocks: None,
        limit_block: None,
        lz4_frames: None,
    }
}

/// Restore and validate of the backup as it now is in the catalog: both fail, the restore
/// writes no file, and nothing outside the target and the catalog changes.
fn both_refuse(env: &Env, case: &str) {
    let before = env.outside_state();
    let target = env.dir.path().join(format!("target-{case}"));
    let r = env.restore(&target);
    assert!(!r.status.success(), "{case}: restore succeeded");
    assert_eq!(
        files_below(&target),
        Vec::<PathBuf>::new(),
        "{case}: restore wrote files before refusing: {}",
        stderr(&r)
    );
    let v = env.validate(None);
    assert!(
        !v.status.success(),
        "{case}: validate called the backup valid: {}",
        stderr(&v)
    );
    assert!(
        env.outside_state() == before,
        "{case}: something outside the target and the catalog changed"
    );
}

#[test]
fn hostile_catalog_is_refused_and_nothing_outside_changes() {
    let env = Env::new();
    let bdir = env.bdir();
    let good_manifest = std::fs::read(bdir.join("manifest")).unwrap();
    let good_meta = std::fs::read(bdir.join("backup.json")).unwrap();
    let entries = super::env::manifest_entries(&bdir.join("manifest")).unwrap();
    assert!(entries.iter().any(|e| e.path == "PG_VERSION"));
    let put_back = || {
        std::fs::write(bdir.join("manifest"), &good_manifest).unwrap();
        std::fs::write(bdir.join("backup.json"), &good_meta).unwrap();
    };
    // today's backup is accepted
    ok(env.validate(None), "validate of the good backup");
    let pristine = env.outside_state();

    // 1. a file entry with an absolute path (its stored file planted where a restore that
    //    joins paths blindly would read it)
    let evil = env.outside.join("evil-abs");
    let abs = evil.to_str().unwrap().to_string();
    let mut m = entries.clone();
    m.push(file_entry(abs.clone(), b"pwned\n"));
    env.write_manifest(&m);
    env.plant(&bdir.join("database").join(&abs[1..]), b"pwned\n");
    both_refuse(&env, "absolute");
    assert!(!evil.exists());
    put_back();

    // 2. a file entry with `..`
    let mut m = entries.clone();
    m.push(file_entry("../outside/evil-rel".into(), b"pwned\n"));
    env.write_manifest(&m);
    env.plant(&bdir.join("outside/evil-rel"), b"pwned\n");
    both_refuse(&env, "dotdot");
    assert!(!env.outside.join("evil-rel").exists());
    put_back();

    // 3. an absolute directory entry (restore used to chmod it 0700)
    let mut m = entries.clone();
    m.insert(
        0,
        FileEntry::dir(env.outside.join("victim-dir").to_str().unwrap().into()),
    );
    env.write_manifest(&m);
    both_refuse(&env, "absolute-dir");
    put_back();

    // 4. a stored file replaced by a symlink to a sentinel: validate must neither read it
    //    nor record its size or CRC; restore refuses it
    let stored = bdir.join("database/PG_VERSION");
    let saved = std::fs::read(&stored).unwrap();
    std::fs::remove_file(&stored).unwrap();
    std::os::unix::fs::symlink(env.outside.join("secret"), &stored).unwrap();
    let before = env.outside_state();
    let target = env.dir.path().join("target-link");
    let r = env.restore(&target);
    assert!(!r.status.success(), "restore read through a symlink");
    for f in files_below(&target) {
        assert_ne!(std::fs::read(&f).unwrap(), env.secret, "{f:?}");
    }
    let v = env.validate(None);
    assert!(!v.status.success(), "validate: {}", stderr(&v));
    let recorded = String::from_utf8_lossy(&std::fs::read(bdir.join("backup.json")).unwrap())
        .into_owned()
        + &stderr(&v);
    let crc = format!("{:08x}", crc32c::crc32c(&env.secret));
    assert!(
        !recorded.contains(&crc) && !recorded.contains("12345 bytes"),
        "the sentinel's size or CRC was recorded: {recorded}"
    );
    assert!(env.outside_state() == before);
    std::fs::remove_file(&stored).unwrap();
    env.plant(&stored, &saved);
    put_back();

    // 5. database/base is a symlink to a copy of it elsewhere: not read as the backup
    let base = bdir.join("database/base");
    let copy = env.dir.path().join("base-copy");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&base)
            .arg(&copy),
    );
    let moved = bdir.join("base-moved-away");
    std::fs::rename(&base, &moved).unwrap();
    std::os::unix::fs::symlink(&copy, &base).unwrap();
    both_refuse(&env, "base-link");
    std::fs::remove_file(&base).unwrap();
    std::fs::rename(&moved, &base).unwrap();
    put_back();

    // 5b. the backup directory itself is a symlink to a copy of it outside the catalog:
    //     refused (not listed), not read
    let away = env.dir.path().join("backup-copy");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&bdir)
            .arg(&away),
    );
    let parked = env.cat.join("instances/db/parked");
    std::fs::rename(&bdir, &parked).unwrap();
    std::os::unix::fs::symlink(&away, &bdir).unwrap();
    let before = env.outside_state();
    let target = env.dir.path().join("target-bdir-link");
    let r = env.restore(&target);
    assert!(
        !r.status.success(),
        "restore read a symlinked backup directory"
    );
    assert_eq!(files_below(&target), Vec::<PathBuf>::new());
    let v = env.validate(Some(&env.id));
    assert!(!v.status.success(), "{}", stderr(&v));
    let show = ok(
        walnut(&["show", "-B", env.cat(), "--format", "json"]),
        "show",
    );
    assert!(!show.contains(&env.id), "{show}");
    assert!(env.outside_state() == before);
    std::fs::remove_file(&bdir).unwrap();
    std::fs::rename(&parked, &bdir).unwrap();
    put_back();

    // 6. backup.json whose id leads out of the catalog: validate writes nothing there
    let good = meta::decode(&good_meta, "backup.json").unwrap();
    for bad_id in ["../../x", "../../../../outside"] {
        let m = meta::BackupMeta {
            id: bad_id.into(),
            ..good.clone()
        };
        std::fs::write(bdir.join("backup.json"), meta::encode(&m).unwrap()).unwrap();
        let before = env.outside_state();
        env.validate(None);
        let v = env.validate(Some(&env.id));
        assert!(!v.status.success(), "{bad_id}: {}", stderr(&v));
        assert!(env.outside_state() == before, "{bad_id}");
        assert!(!env.cat.join("instances/x").exists(), "{bad_id}");
        assert!(!env.outside.join("backup.json").exists(), "{bad_id}");
        let show = ok(
            walnut(&["show", "-B", env.cat(), "--format", "json"]),
            "show",
        );
        assert!(!show.contains(bad_id), "{bad_id}: {show}");
        put_back();
    }

    // 7. the same backup, put back, still validates and restores
    assert!(env.outside_state() == pristine);
    ok(env.validate(None), "validate after the cases");
    let target = env.dir.path().join("target-good");
    ok(env.restore(&target), "restore of the good backup");
    assert_eq!(
        std::fs::read(target.join("PG_VERSION")).unwrap(),
        std::fs::read(env.pg.data.join("PG_VERSION")).unwrap()
    );
    assert!(env.outside_state() == pristine);
}

/// The catalog marker is checked: empty, garbage, an unknown format, a symlink and a
/// directory are refused with one line naming the marker; what `walnut init` writes is
/// accepted.
#[test]
fn a_bad_catalog_marker_is_refused() {
    let dir = pg_tempdir("cat-marker");
    let cat = dir.path().join("cat");
    let c = cat.to_str().unwrap();
    ok(walnut(&["init", "-B", c]), "init");
    ok(walnut(&["show", "-B", c]), "show of a new catalog");
    let marker = cat.join("walnut-catalog.json");
    let good = std::fs::read(&marker).unwrap();
    let elsewhere = dir.path().join("marker-elsewhere.json");
    std::fs::write(&elsewhere, &good).unwrap();
    chown_pg(&elsewhere);
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case> = vec![
        ("empty", Box::new(|| std::fs::write(&marker, b"").unwrap())),
        (
            "garbage",
            Box::new(|| std::fs::write(&marker, b"garbage\n").unwrap()),
        ),
        (
            "format 99",
            Box::new(|| std::fs::write(&marker, b"{\"format\":99}").unwrap()),
        ),
        (
            "symlink",
            Box::new(|| {
                std::fs::remove_file(&marker).unwrap();
                std::os::unix::fs::symlink(&elsewhere, &marker).unwrap();
            }),
        ),
        (
            "directory",
            Box::new(|| {
                std::fs::remove_file(&marker).unwrap();
                std::fs::create_dir(&marker).unwrap();
            }),
        ),
    ];
    for (case, make) in cases {
        make();
        let out = walnut(&["show", "-B", c]);
        assert!(!out.status.success(), "{case}: show accepted the marker");
        let err = stderr(&out);
        let line = err
            .lines()
            .find(|l| l.contains("walnut-catalog.json"))
            .unwrap_or_else(|| panic!("{case}: no line names the marker: {err}"));
        assert!(
            line.contains(&marker.display().to_string()),
            "{case}: {err}"
        );
        let fetch = run(as_pg(walnut_bin("walnut-fetch"))
            .args(["-B", c, "--instance", "db"])
            .arg("000000010000000000000001")
            .arg(dir.path().join("seg")));
        let code = fetch.status.code();
        assert!(
            code != Some(0) && code != Some(1),
            "{case}: walnut-fetch exited {code:?}"
        );
        if marker.is_dir() {
            std::fs::remove_dir(&marker).unwrap();
        } else {
            std::fs::remove_file(&marker).unwrap();
        }
        std::fs::write(&marker, &good).unwrap();
        chown_pg(&marker);
    }
    ok(walnut(&["show", "-B", c]), "show with the marker put back");
}
