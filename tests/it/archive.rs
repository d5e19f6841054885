//! walnut-archive / walnut-fetch / show --archive against real PostgreSQL 15 clusters.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::harness::*;

pub(crate) fn push(cat: &Path, path: &Path, name: &str, extra: &[&str]) -> Output {
    let mut c = as_pg(walnut_bin("walnut-archive"));
    c.arg("-B").arg(cat).args(["--instance", "db"]).args(extra);
    c.arg(path).arg(name);
    run(&mut c)
}

pub(crate) fn fetch(cat: &Path, name: &str, dest: &Path) -> Output {
    let mut c = as_pg(walnut_bin("walnut-fetch"));
    c.arg("-B")
        .arg(cat)
        .args(["--instance", "db", "--prefetch", "0"]);
    c.arg(name).arg(dest);
    run(&mut c)
}

pub(crate) fn show_json(cat: &Path, verify: bool) -> (bool, serde_json::Value) {
    let mut args = vec![
        "show",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "db",
        "--archive",
        "--format",
        "json",
    ];
    if verify {
        args.push("--verify");
    }
    let out = walnut(&args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "show json: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

fn archived_names(cat: &Path, tli: &str) -> Vec<String> {
    let dir = cat.join("instances/db/wal").join(tli);
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Temp files left in a timeline's directory or in its `.tmp/` directory.
pub(crate) fn temp_files(cat: &Path, tli: &str) -> Vec<String> {
    archived_names(cat, tli)
        .into_iter()
        .chain(archived_names(cat, &format!("{tli}/.tmp")))
        .filter(|f| f.contains("walnut-tmp"))
        .collect()
}

/// Pushes every segment (look-ahead off) and checks that the archive then holds exactly
/// them, all verifiable.
fn push_all_and_check(cat: &Path, segs: &[PathBuf], what: &str) {
    for s in segs {
        ok(push(cat, s, &fname(s), &["--look-ahead", "0"]), what);
    }
    let (clean, report) = show_json(cat, true);
    assert!(clean, "{report}");
    assert_eq!(
        report["timelines"][0]["segments"].as_u64(),
        Some(segs.len() as u64),
        "{report}"
    );
}

/// `lz4 -d` of an archived file with the stock CLI.
fn lz4_decompress(file: &Path) -> Vec<u8> {
    let out = run(Command::new("lz4").arg("-d").arg("-c").arg(file));
    assert!(
        out.status.success(),
        "lz4 -d {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A stopped 1 MiB-segment cluster that produced `n` complete segments, copied (readable by
/// the cluster owner) to DIR/segs; returns the cluster and the copies, oldest first.
pub(crate) fn make_segments(dir: &Path, name: &str, n: usize) -> (Pg, Vec<PathBuf>) {
    let mut pg = Pg::init(&pg_bin(), dir, name, &["--wal-segsize=1"]);
    pg.append_conf("wal_keep_size = '1GB'");
    pg.start();
    pg.psql("postgres", "create table t(i int, s text)");
    for i in 0..n + 2 {
        pg.psql(
            "postgres",
            &format!(
                "insert into t select g, md5(g::text) from generate_series(1, {}) g",
                2000 + i
            ),
        );
        pg.psql("postgres", "select pg_switch_wal()");
    }
    let current = pg.psql("postgres", "select pg_walfile_name(pg_current_wal_lsn())");
    pg.stop();
    let segs = pg_mkdir(&dir.join(format!("{name}-segs")));
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(pg.data.join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() < current.as_str())
        .collect();
    names.sort();
    for n in names {
        let dst = segs.join(&n);
        std::fs::copy(pg.data.join("pg_wal").join(&n), &dst).unwrap();
        out.push(dst);
    }
    chown_pg(&segs);
    assert!(out.len() >= n, "only {} segments", out.len());
    (pg, out)
}

/// `make_segments` with every segment pushed into a fresh catalog DIR/cat; returns the
/// segments and the catalog.
pub(crate) fn archived_segments(dir: &Path, name: &str, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let (pg, segs) = make_segments(dir, name, n);
    let cat = catalog_for(dir, &pg);
    for s in &segs {
        ok(push(&cat, s, &fname(s), &[]), "push");
    }
    (segs, cat)
}

pub(crate) fn fname(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// pgbench at full speed archives without a single failure; every archived file
/// decompresses with the stock lz4 CLI to the original bytes; a standby replays the whole
/// archive through walnut-fetch and reaches the primary's data.
#[test]
fn archive_under_load_then_standby_replays_archive() {
    let dir = pg_tempdir("arch-load");
    let mut pg = Pg::init(&pg_bin(), dir.path(), "primary", &["-k", "--wal-segsize=1"]);
    let cat = catalog_for(dir.path(), &pg);
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {} --instance db %p %f'\nwal_keep_size = '2GB'\nmax_wal_size = '2GB'",
        walnut_bin("walnut-archive").display(),
        cat.display()
    ));
    pg.start();
    // base backup first (WAL from the archive only: -X none)
    let base = dir.path().join("standby");
    run_ok(
        pg.client("pg_basebackup")
            .arg("-D")
            .arg(&base)
            .args(["-X", "none", "-c", "fast"]),
    );
    pg.pgbench(&["-i", "-s", "5", "-q", "postgres"]);
    pg.pgbench(&["-c", "4", "-j", "2", "-T", "15", "-n", "postgres"]);
    pg.switch_and_wait_archived();
    let failed = pg.psql("postgres", "select failed_count from pg_stat_archiver");
    assert_eq!(
        failed,
        "0",
        "archive failures under load\n{}",
        pg.server_log()
    );
    let archived: i64 = pg
        .psql("postgres", "select archived_count from pg_stat_archiver")
        .parse()
        .unwrap();
    assert!(archived > 20, "only {archived} segments archived");

    // every archived segment still in pg_wal decompresses (stock lz4) to identical bytes
    let tli_dir = cat.join("instances/db/wal/00000001");
    let mut compared = 0;
    for f in archived_names(&cat, "00000001") {
        let Some(seg) = f.strip_suffix(".lz4") else {
            continue;
        };
        if seg.len() != 24 {
            continue;
        }
        let orig = pg.data.join("pg_wal").join(seg);
        if let Ok(bytes) = std::fs::read(&orig) {
            assert!(lz4_decompress(&tli_dir.join(&f)) == bytes, "{f} differs");
            compared += 1;
        }
    }
    assert!(compared > 20, "compared only {compared}");
    let (clean, report) = show_json(&cat, true);
    assert!(clean, "show --archive --verify: {report}");
    let t = &report["timelines"][0];
    assert_eq!(t["gaps"].as_array().unwrap().len(), 0, "{report}");
    assert!(t["segments"].as_u64().unwrap() >= compared as u64);
    // indexed on arrival: every segment but possibly the newest has a complete index
    assert_eq!(t["index_missing"].as_array().unwrap().len(), 0, "{report}");
    assert!(t["pending"].as_u64().unwrap() <= 1, "{report}");
    assert!(
        t["indexed"].as_u64().unwrap() + 1 >= t["segments"].as_u64().unwrap(),
        "{report}"
    );
    assert!(
        t["latest_restorable_time"]
            .as_str()
            .unwrap()
            .starts_with("20"),
        "{report}"
    );

    // standby: restore_command only, replays the archive up to the last archived segment
    let expected = pg.psql(
        "postgres",
        "select sum(abalance), count(*) from pgbench_accounts",
    );
    let target = pg.psql("postgres", "select pg_current_wal_lsn()");
    pg.switch_and_wait_archived();
    chown_pg(&base);
    let mut sb = Pg::existing(&pg_bin(), &base, &pg.sock);
    std::fs::write(base.join("standby.signal"), "").unwrap();
    sb.append_conf(&format!(
        "port = {}\narchive_mode = off\nrestore_command = '{} -B {} --instance db %f %p'",
        sb.port,
        walnut_bin("walnut-fetch").display(),
        cat.display()
    ));
    chown_pg(&base);
    sb.start();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ready = sb.psql(
            "postgres",
            &format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
        );
        if ready == "t" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standby did not replay the archive\n{}",
            sb.server_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let got = sb.psql(
        "postgres",
        "select sum(abalance), count(*) from pgbench_accounts",
    );
    assert_eq!(got, expected);
    sb.stop();
    pg.stop();
}

/// walnut-archive SIGKILLed at random points (>= 100 times, by pid) never leaves a damaged
/// file under a final name; retries complete the archive; temp files get cleaned up.
#[test]
fn archive_survives_sigkill_at_random_points() {
    let dir = pg_tempdir("arch-kill");
    let (pg, segs) = make_segments(dir.path(), "c", 30);
    let cat = catalog_for(dir.path(), &pg);
    // how long one push takes, to spread the kills over it
    let t0 = Instant::now();
    ok(
        push(&cat, &segs[0], &fname(&segs[0]), &["--look-ahead", "0"]),
        "first push",
    );
    let dur = t0.elapsed().as_micros().max(2000) as u64;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut kills = 0;
    let tli_dir = cat.join("instances/db/wal/00000001");
    let mut i = 1;
    let mut round = 0;
    while i < segs.len() || kills < 100 {
        let seg = &segs[i % segs.len()];
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = rng % (dur / 2);
        let mut c = Command::new(walnut_bin("walnut-archive"));
        if is_root() {
            use std::os::unix::process::CommandExt;
            let u = nix::unistd::User::from_name(PG_OS_USER).unwrap().unwrap();
            c.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
        c.arg("-B")
            .arg(&cat)
            .args(["--instance", "db", "--look-ahead", "0"])
            .arg(seg)
            .arg(fname(seg))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_micros(delay));
        // a pid-specific SIGKILL (Child::kill), never by name
        let still_running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let _ = child.wait();
        if still_running {
            kills += 1;
        }
        // never a damaged file under a final name
        if let Ok(bytes) = std::fs::read(tli_dir.join(format!("{}.lz4", fname(seg)))) {
            let (_, data) = walnut::format::segment::decode(&bytes, &fname(seg))
                .unwrap_or_else(|e| panic!("after a kill: {e}"));
            assert!(data == std::fs::read(seg).unwrap());
        }
        // "PostgreSQL retries": every fourth round finishes the segment without a kill
        round += 1;
        if round % 4 == 0 {
            ok(
                push(&cat, seg, &fname(seg), &["--look-ahead", "0"]),
                "retry",
            );
            i += 1;
        }
        assert!(round < 2000, "too many rounds");
    }
    eprintln!("{kills} kills in {round} rounds, push takes ~{dur} us");
    assert!(kills >= 100, "only {kills} kills landed");
    // complete and verifiable, no temp files left
    push_all_and_check(&cat, &segs, "final push");
    let temps = temp_files(&cat, "00000001");
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    for s in &segs {
        let dest = dir.path().join("restored");
        ok(fetch(&cat, &fname(s), &dest), "fetch");
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(s).unwrap());
    }
}

/// A tmpfs mount that is unmounted when dropped.
struct Tmpfs(PathBuf);
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full archive disk: non-zero exit with a clear message, no partial file under a final
/// name, and archiving resumes by itself once there is space again.
#[test]
fn archive_full_disk_fails_cleanly_and_resumes() {
    if !is_root() {
        eprintln!("needs root to mount a tmpfs");
        return;
    }
    let dir = pg_tempdir("arch-full");
    let mnt = pg_mkdir(&dir.path().join("mnt"));
    let uid = run_ok(Command::new("id").args(["-u", PG_OS_USER]));
    run_ok(Command::new("mount").args([
        "-t",
        "tmpfs",
        "-o",
        &format!("size=1M,mode=0755,uid={}", uid.trim()),
        "tmpfs",
        mnt.to_str().unwrap(),
    ]));
    let _guard = Tmpfs(mnt.clone());
    let (pg, segs) = make_segments(dir.path(), "f", 6);
    let cat = catalog_for(&mnt, &pg);
    // fill the disk but for a few KiB, so the next segment cannot fit
    let filler = mnt.join("filler");
    let _ = Command::new("dd")
        .arg("if=/dev/urandom")
        .arg(format!("of={}", filler.display()))
        .args(["bs=4k", "count=1000"])
        .output();
    let mut failed = None;
    for s in &segs {
        let out = push(&cat, s, &fname(s), &["--look-ahead", "0"]);
        if !out.status.success() {
            failed = Some((s.clone(), out));
            break;
        }
    }
    let (seg, out) = failed.expect("the full disk made no push fail");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk full"), "{err}");
    let name = fname(&seg);
    assert!(err.contains(&name), "{err}");
    let files = archived_names(&cat, "00000001");
    assert!(!files.contains(&format!("{name}.lz4")), "{files:?}");
    let temps = temp_files(&cat, "00000001");
    assert!(temps.is_empty(), "temp files left: {temps:?}");
    std::fs::remove_file(&filler).unwrap();
    push_all_and_check(&cat, &segs, "after space freed");
}

/// Several processes pushing the same segment at once: all succeed with identical content;
/// with different content exactly one wins and the archive holds the winner's bytes.
#[test]
fn concurrent_pushes_of_one_segment() {
    let dir = pg_tempdir("arch-race");
    let (pg, segs) = make_segments(dir.path(), "r", 12);
    let cat = catalog_for(dir.path(), &pg);
    for s in &segs[..10] {
        let outs: Vec<Output> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| push(&cat, s, &fname(s), &["--look-ahead", "0"])))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for o in outs {
            ok(o, "concurrent identical push");
        }
    }
    // different content, same name: a copy of the last segment with a changed tail byte
    let s = &segs[11];
    let other = dir.path().join("other").join(fname(s));
    pg_mkdir(other.parent().unwrap());
    let mut bytes = std::fs::read(s).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&other, &bytes).unwrap();
    chown_pg(other.parent().unwrap());
    let (a, b) = std::thread::scope(|sc| {
        let ha = sc.spawn(|| push(&cat, s, &fname(s), &["--look-ahead", "0"]));
        let hb = sc.spawn(|| push(&cat, &other, &fname(s), &["--look-ahead", "0"]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert!(a.status.success() != b.status.success(), "{a:?} {b:?}");
    let loser = if a.status.success() { &b } else { &a };
    assert!(String::from_utf8_lossy(&loser.stderr).contains("DIFFERENT content"));
    let dest = dir.path().join("got");
    ok(fetch(&cat, &fname(s), &dest), "fetch");
    let winner = if a.status.success() {
        std::fs::read(s).unwrap()
    } else {
        bytes
    };
    assert!(std::fs::read(&dest).unwrap() == winner);
    let (clean, report) = show_json(&cat, true);
    assert!(clean, "{report}");
}

/// Corruption is fatal to recovery (exit 200, file named, nothing written) and reported
/// by show --archive --verify; absence is exit 1.
#[test]
fn fetch_corrupt_and_missing() {
    let dir = pg_tempdir("arch-corrupt");
    let (segs, cat) = archived_segments(dir.path(), "x", 3);
    let name = fname(&segs[1]);
    let f = cat.join(format!("instances/db/wal/00000001/{name}.lz4"));
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&f, &bytes).unwrap();
    let dest = dir.path().join("RECOVERYXLOG");
    let out = fetch(&cat, &name, &dest);
    assert_eq!(out.status.code(), Some(walnut::EXIT_FETCH_FATAL));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&name));
    assert!(!dest.exists(), "a corrupt file was written to %p");
    let (clean, report) = show_json(&cat, true);
    assert!(!clean);
    let corrupt = report["timelines"][0]["corrupt"].as_array().unwrap();
    assert_eq!(corrupt.len(), 1, "{report}");
    assert_eq!(corrupt[0][0].as_str(), Some(name.as_str()));
    // absent: exit 1, nothing written
    let out = fetch(&cat, "0000000100000000000000F0", &dest);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = fetch(&cat, "00000005.history", &dest);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!dest.exists());
    // intact ones are served
    ok(fetch(&cat, &fname(&segs[0]), &dest), "fetch good");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&segs[0]).unwrap());
}

/// Duplicates, .history never overwritten, .partial/.backup stored as they are, foreign
/// system id / bad magic / bad size refused, a segment that cannot be decoded is stored
/// with its index marked missing.
#[test]
fn archive_rules_duplicates_history_foreign_and_undecodable() {
    let dir = pg_tempdir("arch-rules");
    let (pg, segs) = make_segments(dir.path(), "m", 3);
    let cat = catalog_for(dir.path(), &pg);
    let s0 = &segs[0];
    ok(push(&cat, s0, &fname(s0), &[]), "push");
    ok(push(&cat, s0, &fname(s0), &[]), "duplicate identical");

    let files = pg_mkdir(&dir.path().join("files"));
    let put = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = files.join(name);
        std::fs::write(&p, bytes).unwrap();
        chown_pg(&p);
        p
    };
    // .history
    let h = put(
        "00000002.history",
        b"1\t0/3000000\tno recovery target specified\n",
    );
    ok(push(&cat, &h, "00000002.history", &[]), "history");
    ok(push(&cat, &h, "00000002.history", &[]), "history again");
    let h2 = put("h2", b"1\t0/4000000\tsomething else\n");
    let out = push(&cat, &h2, "00000002.history", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DIFFERENT content"));
    let dest = dir.path().join("RECOVERYHISTORY");
    ok(fetch(&cat, "00000002.history", &dest), "fetch history");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&h).unwrap());
    let ar =
        walnut::archive::WalArchive::open(&walnut::catalog::Catalog::open(&cat).unwrap(), "db")
            .unwrap();
    let hist = ar.timeline_history(2).unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].tli, 1);

    // .backup and .partial stored as they are; the partial is served for the full name
    let b = put(
        "000000010000000000000002.00000028.backup",
        b"START WAL LOCATION: 0/2000028\n",
    );
    ok(
        push(&cat, &b, "000000010000000000000002.00000028.backup", &[]),
        "backup file",
    );
    let s2 = &segs[2];
    let pname = format!("{}.partial", fname(s2));
    ok(push(&cat, s2, &pname, &[]), "partial");
    let d2 = dir.path().join("RECOVERYXLOG");
    ok(fetch(&cat, &fname(s2), &d2), "partial served for full name");
    assert!(std::fs::read(&d2).unwrap() == std::fs::read(s2).unwrap());

    // foreign system id: another cluster's first segment
    let other = Pg::init(&pg_bin(), dir.path(), "other", &["--wal-segsize=1"]);
    let fseg = std::fs::read_dir(other.data.join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.len() == 24)
        .expect("a segment in the new cluster");
    let foreign = put(
        &fseg,
        &std::fs::read(other.data.join("pg_wal").join(&fseg)).unwrap(),
    );
    let out = push(&cat, &foreign, &fseg, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("system identifier"),
        "{out:?}"
    );
    // bad page magic, bad size
    let mut bytes = std::fs::read(&segs[1]).unwrap();
    let good = bytes.clone();
    bytes[0] ^= 0xFF;
    let bad = put(&fname(&segs[1]), &bytes);
    let out = push(&cat, &bad, &fname(&segs[1]), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("magic"),
        "{out:?}"
    );
    let short = put("short", &good[..4096]);
    let out = push(&cat, &short, &fname(&segs[1]), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("size"),
        "{out:?}"
    );
    assert!(!ar.is_archived(&fname(&segs[1]).parse().unwrap()).unwrap());

    // undecodable: garbage after a valid first page; archived, index marked missing
    let mut garbage = good.clone();
    for (i, b) in garbage.iter_mut().enumerate().skip(8192) {
        *b = (i * 31 % 251) as u8;
    }
    let g = put(&fname(&segs[1]), &garbage);
    let out = push(&cat, &g, &fname(&segs[1]), &[]);
    ok(out, "undecodable segment is still archived");
    let (_, report) = show_json(&cat, false);
    let missing = report["timelines"][0]["index_missing"].as_array().unwrap();
    assert!(
        missing
            .iter()
            .any(|m| m[0].as_str() == Some(fname(&segs[1]).as_str())),
        "{report}"
    );
    let dest = dir.path().join("g");
    ok(fetch(&cat, &fname(&segs[1]), &dest), "fetch undecodable");
    assert!(std::fs::read(&dest).unwrap() == garbage);
}

pub(crate) fn wait_for(p: &Path, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Pushes `names[own]` with look-ahead `ahead`, waits until the background pusher has
/// acknowledged the `ahead` segments after it, and has exited.
fn push_and_wait_acks(cat: &Path, pg_wal: &Path, names: &[String], own: usize, ahead: usize) {
    let spool = pg_wal.join("walnut-spool");
    ok(
        push(
            cat,
            &pg_wal.join(&names[own]),
            &names[own],
            &["--look-ahead", &ahead.to_string()],
        ),
        "push with look-ahead",
    );
    for n in &names[own + 1..=own + ahead] {
        assert!(
            wait_for(&spool.join(format!("{n}.ok")), 30),
            "{n} not acknowledged"
        );
    }
    assert!(
        wait_pusher_gone(&spool, 30),
        "background pusher still running"
    );
}

/// Whether the background pusher's lock is free within `secs`.
fn wait_pusher_gone(spool: &Path, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let lock = spool.join(".look-ahead.lock");
    while Instant::now() < deadline {
        match std::fs::File::open(&lock) {
            Err(_) => return true,
            Ok(f) if fs2::FileExt::try_lock_shared(&f).is_ok() => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

/// Look-ahead pushes other `.ready` segments and acknowledges them; later calls consume
/// verified acknowledgements; a wrong acknowledgement is not trusted. Prefetch fills a
/// bounded spool in the background, and a damaged prefetched copy is never served.
#[test]
fn look_ahead_acknowledgements_and_prefetch_spool() {
    let dir = pg_tempdir("arch-ahead");
    let (pg, segs) = make_segments(dir.path(), "la", 8);
    let cat = catalog_for(dir.path(), &pg);
    let pg_wal = pg_mkdir(&dir.path().join("pgd/pg_wal"));
    let status = pg_mkdir(&pg_wal.join("archive_status"));
    for s in &segs {
        std::fs::copy(s, pg_wal.join(fname(s))).unwrap();
        std::fs::write(status.join(format!("{}.ready", fname(s))), "").unwrap();
    }
    chown_pg(&pg_wal);
    let names: Vec<String> = segs.iter().map(|s| fname(s)).collect();
    // the look-ahead spool is local working state beside pg_wal, not catalog content
    let spool = pg_wal.join("walnut-spool");
    // the background pusher acknowledges 1..=4 (4 ahead), then gives up waiting for
    // PostgreSQL to consume them and exits
    push_and_wait_acks(&cat, &pg_wal, &names, 0, 4);
    assert!(
        !cat.join("instances/db/spool").exists(),
        "spool in the catalog"
    );
    let ar =
        walnut::archive::WalArchive::open(&walnut::catalog::Catalog::open(&cat).unwrap(), "db")
            .unwrap();
    for (i, n) in names.iter().enumerate() {
        let acked = spool.join(format!("{n}.ok")).exists();
        let archived = ar.is_archived(&n.parse().unwrap()).unwrap();
        assert_eq!(acked, (1..=4).contains(&i), "{n} ack");
        assert_eq!(archived, i <= 4, "{n} archived");
    }
    // the next call finds its acknowledgement and consumes it
    ok(
        push(
            &cat,
            &pg_wal.join(&names[1]),
            &names[1],
            &["--look-ahead", "0"],
        ),
        "acked push",
    );
    assert!(!spool.join(format!("{}.ok", names[1])).exists());
    // a wrong acknowledgement is not trusted: the archive is checked again (same content: 0)
    let ack = spool.join(format!("{}.ok", names[2]));
    let text = std::fs::read_to_string(&ack).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bogus = text.replace(&format!("\"crc32c\":{}", v["crc32c"]), "\"crc32c\":12345");
    assert_ne!(bogus, text);
    std::fs::write(&ack, bogus).unwrap();
    ok(
        push(
            &cat,
            &pg_wal.join(&names[2]),
            &names[2],
            &["--look-ahead", "0"],
        ),
        "push with bad ack",
    );
    assert!(!ack.exists());
    // indexes are complete (look-ahead pushed them out of order, in parallel)
    for n in &names[..4] {
        let segno = n
            .parse::<walnut::WalFileName>()
            .unwrap()
            .segno(1 << 20)
            .unwrap();
        let st = ar.index_state(1, segno).unwrap();
        assert!(
            matches!(st, walnut::archive::IndexState::Indexed(_)),
            "{n}: {st:?}"
        );
    }

    // a lost index file is rebuilt by ensure_index (what backups call)
    let seg0 = names[0]
        .parse::<walnut::WalFileName>()
        .unwrap()
        .segno(1 << 20)
        .unwrap();
    std::fs::remove_file(
        cat.join("instances/db/wal/00000001")
            .join(format!("{}.idx", names[0])),
    )
    .unwrap();
    assert!(matches!(
        ar.index_state(1, seg0).unwrap(),
        walnut::archive::IndexState::Missing(_)
    ));
    assert!(matches!(
        ar.ensure_index(1, seg0).unwrap(),
        walnut::archive::IndexState::Indexed(_)
    ));
    assert!(matches!(
        ar.index_state(1, seg0 + 100).unwrap(),
        walnut::archive::IndexState::NotArchived
    ));

    // PostgreSQL marks 0..=4 done; an acknowledgement left for a done segment is stale and
    // the next background pusher removes it; the call for 5 starts one (it pushes 6 and 7,
    // 2 ahead, never 5 itself), and the call for 6 takes its acknowledgement.
    for n in &names[..=4] {
        std::fs::rename(
            status.join(format!("{n}.ready")),
            status.join(format!("{n}.done")),
        )
        .unwrap();
    }
    let stale: Vec<PathBuf> = names[3..=4]
        .iter()
        .map(|n| spool.join(format!("{n}.ok")))
        .collect();
    assert!(stale.iter().all(|p| p.exists()));
    push_and_wait_acks(&cat, &pg_wal, &names, 5, 2);
    assert!(
        stale.iter().all(|p| !p.exists()),
        "stale acknowledgement kept"
    );
    assert!(!spool.join(format!("{}.ok", names[5])).exists());
    ok(
        push(
            &cat,
            &pg_wal.join(&names[6]),
            &names[6],
            &["--look-ahead", "2"],
        ),
        "acknowledged push",
    );
    assert!(!spool.join(format!("{}.ok", names[6])).exists());
    assert!(spool.join(format!("{}.ok", names[7])).exists());

    // prefetch: asking for segment 0 fills the spool with 1..=3 in the background
    let rec = pg_mkdir(&dir.path().join("rec/pg_wal"));
    let dest = rec.join("RECOVERYXLOG");
    let fetch_k = |n: &str, k: &str| {
        let mut c = as_pg(walnut_bin("walnut-fetch"));
        c.arg("-B")
            .arg(&cat)
            .args(["--instance", "db", "--prefetch", k])
            .arg(n)
            .arg(&dest);
        run(&mut c)
    };
    ok(fetch_k(&names[0], "3"), "fetch with prefetch");
    let pf = rec.join("walnut-prefetch");
    assert!(
        wait_for(&pf.join(format!("{}.json", names[3])), 30),
        "prefetch did not run"
    );
    assert!(!pf.join(&names[4]).exists(), "prefetched beyond the window");
    ok(fetch_k(&names[1], "0"), "fetch from spool");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&segs[1]).unwrap());
    assert!(
        !pf.join(&names[1]).exists(),
        "served entry left in the spool"
    );
    // a damaged prefetched copy is dropped and the archive used instead
    let p2 = pf.join(&names[2]);
    let mut b = std::fs::read(&p2).unwrap();
    b[100] ^= 1;
    std::fs::write(&p2, &b).unwrap();
    ok(fetch_k(&names[2], "0"), "fetch past a damaged spool entry");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&segs[2]).unwrap());
    assert!(!p2.exists());
}

/// add-instance records what pg_control says (checked against pg_controldata) and takes
/// connection options from PG* variables when not given.
#[test]
fn add_instance_records_control_data_and_pg_env() {
    let dir = pg_tempdir("arch-add");
    let pg = Pg::init(&pg_bin(), dir.path(), "d", &["-k", "--wal-segsize=4"]);
    let cat = dir.path().join("cat");
    ok(walnut(&["init", "-B", cat.to_str().unwrap()]), "init");
    let mut c = as_pg(walnut_bin("walnut"));
    c.args([
        "add-instance",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "main",
        "-D",
    ])
    .arg(&pg.data)
    .args(["-U", "alice"])
    .env("PGHOST", "/var/run/x")
    .env("PGPORT", "6543")
    .env("PGUSER", "bob");
    ok(run(&mut c), "add-instance");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cat.join("instances/main/instance.json")).unwrap())
            .unwrap();
    let mut cd = pg.cmd("pg_controldata");
    cd.arg("-D").arg(&pg.data).env("LC_ALL", "C");
    let out = run_ok(&mut cd);
    let sysid = out
        .lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(j["system_id"].to_string(), sysid);
    assert_eq!(j["pg_major"], 15);
    assert_eq!(j["wal_segment_size"], 4 << 20);
    assert_eq!(j["block_size"], 8192);
    assert_eq!(j["data_checksums"], true);
    assert_eq!(j["host"], "/var/run/x");
    assert_eq!(j["port"], 6543);
    assert_eq!(j["user"], "alice");
    // a second add-instance of the same name is refused
    let out = walnut(&[
        "add-instance",
        "-B",
        cat.to_str().unwrap(),
        "--instance",
        "main",
        "-D",
        pg.data.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}
