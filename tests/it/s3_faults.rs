//! Faults on a real S3 server (Garage 2.5.0 and s3s-fs 0.14.1, started by the tests): the
//! server killed during an archive push and during a backup, flipped bytes in stored
//! objects, leases (locks on object storage) held, excluded and taken over after a holder
//! is killed, and `walnut metrics` / `walnut check` on an S3 catalog.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use walnut::repo::{LockMode, Repo, S3Repo};

use super::harness::*;
use super::s3::{
    backup_s3, fetch, push, restore_and_compare, s3_primary, stderr, walnut_s3, Kind, S3Server,
};

/// The lease the fault tests give walnut (seconds), so that a dead holder's lock expires
/// quickly.
const LEASE: u64 = 3;

fn both(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `walnut show --format json` rows.
fn show_rows(conf: &Path, url: &str) -> Vec<serde_json::Value> {
    let out = ok(
        walnut_s3(
            conf,
            &["show", "-B", url, "--instance", "db", "--format", "json"],
        ),
        "show --format json",
    );
    match serde_json::from_str(&out).unwrap() {
        serde_json::Value::Array(v) => v,
        v => panic!("show json: {v}"),
    }
}

fn status(conf: &Path, url: &str, id: &str) -> String {
    show_rows(conf, url)
        .into_iter()
        .find(|r| r["id"] == id)
        .map(|r| r["status"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// XORs 16 bytes two thirds into `b` (past any header; a single flipped bit can decode
/// unchanged, 16 bytes cannot).
fn damage(b: &[u8]) -> Vec<u8> {
    let mut v = b.to_vec();
    let at = v.len() - v.len() / 3;
    assert!(v.len() > 64, "object too small: {}", v.len());
    for x in &mut v[at..at + 16] {
        *x ^= 0x5A;
    }
    v
}

/// Replaces a stored object's bytes: on s3s-fs by editing its file in the server's
/// storage, on Garage (content-addressed blocks) by deleting and re-uploading it with a
/// signed PUT carrying the damaged bytes' own checksum, as a bad writer would.
fn replace_object(s: &S3Server, repo: &S3Repo, prefix: &str, key: &str, bytes: &[u8]) {
    match s.kind {
        Kind::S3sFs => {
            let f = s.data().join(&s.bucket).join(prefix).join(key);
            assert!(f.is_file(), "{} not stored as a file", f.display());
            std::fs::write(&f, bytes).unwrap();
        }
        Kind::Garage => {
            repo.delete(key).unwrap();
            repo.put_new(key, bytes).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Leases

/// A repository as another host would see it: its own local lock directory (so only the
/// lease, never a shared flock, can exclude), with a short lease.
fn host_repo(s: &S3Server, host: &str) -> S3Repo {
    let mut c = s.repo("lk").config().clone();
    c.lock_dir = s.dir.path().join(format!("locks-{host}"));
    c.lease = Duration::from_secs(LEASE);
    S3Repo::new(c).unwrap()
}

const LOCK: &str = "instances/db/.lease-test";

fn lease_rules(s: &S3Server) {
    let a = host_repo(s, "a");
    let b = host_repo(s, "b");
    let c = host_repo(s, "c");
    // exclusive excludes both modes on another host; released, it is free again
    let la = a.lock(LOCK, LockMode::Exclusive, false).unwrap();
    assert!(la.is_some());
    let held = a.lease_holders(LOCK).unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].starts_with(&format!("x-{LEASE}-")), "{held:?}");
    assert!(b.lock(LOCK, LockMode::Exclusive, false).unwrap().is_none());
    assert!(b.lock(LOCK, LockMode::Shared, false).unwrap().is_none());
    // a lease is renewed while held: still excluded after twice its duration
    std::thread::sleep(Duration::from_secs(2 * LEASE + 1));
    assert!(b.lock(LOCK, LockMode::Exclusive, false).unwrap().is_none());
    // the failed attempts left nothing behind
    assert_eq!(a.lease_holders(LOCK).unwrap().len(), 1);
    // a waiting taker gets it once the holder lets go
    let b2 = b.clone();
    let t0 = Instant::now();
    let waiter = std::thread::spawn(move || {
        b2.lock(LOCK, LockMode::Exclusive, true)
            .unwrap()
            .map(|l| (l, Instant::now()))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let released = Instant::now();
    drop(la);
    let (lb, got) = waiter.join().unwrap().expect("waited for the lock");
    assert!(got >= released, "taken while held");
    assert!(t0.elapsed() < Duration::from_secs(15));
    drop(lb);
    assert!(a.lease_holders(LOCK).unwrap().is_empty());
    // shared with shared; exclusive with neither
    let sa = a.lock(LOCK, LockMode::Shared, false).unwrap();
    let sb = b.lock(LOCK, LockMode::Shared, false).unwrap();
    assert!(sa.is_some() && sb.is_some());
    assert!(c.lock(LOCK, LockMode::Exclusive, false).unwrap().is_none());
    drop(sa);
    assert!(c.lock(LOCK, LockMode::Exclusive, false).unwrap().is_none());
    drop(sb);
    assert!(c.lock(LOCK, LockMode::Exclusive, false).unwrap().is_some());

    // a holder killed (SIGKILL, another process): its lease is taken over after expiry
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "s3_faults::s3_lease_holder_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("WALNUT_TEST_LEASE_ENDPOINT", s.endpoint())
        .env("WALNUT_TEST_LEASE_KEY", &s.key)
        .env("WALNUT_TEST_LEASE_SECRET", &s.secret)
        .env("WALNUT_TEST_LEASE_REGION", &s.region)
        .env("WALNUT_TEST_LEASE_DIR", s.dir.path().join("locks-child"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while b.lease_holders(LOCK).unwrap().is_empty() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("lease holder child exited: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "child never held");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(b.lock(LOCK, LockMode::Shared, false).unwrap().is_none());
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let dead = b.lease_holders(LOCK).unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let lb = loop {
        if let Some(l) = b.lock(LOCK, LockMode::Exclusive, false).unwrap() {
            break l;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE + 20),
            "the dead holder's lease was never taken over"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let waited = killed.elapsed();
    assert!(
        waited >= Duration::from_millis(LEASE * 1000 / 3),
        "taken over at once ({waited:?}): the lease was ignored"
    );
    let now = b.lease_holders(LOCK).unwrap();
    assert!(!now.contains(&dead[0]), "the expired lease stayed: {now:?}");
    drop(lb);
}

/// Run by [`lease_rules`] as a separate process: takes the lock and holds it until killed.
#[test]
#[ignore]
fn s3_lease_holder_child() {
    let Ok(endpoint) = std::env::var("WALNUT_TEST_LEASE_ENDPOINT") else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap();
    let repo = S3Repo::new(walnut::repo::S3Config {
        endpoint,
        region: env("WALNUT_TEST_LEASE_REGION"),
        bucket: "walnut".into(),
        prefix: "lk".into(),
        path_style: true,
        access_key: env("WALNUT_TEST_LEASE_KEY"),
        secret_key: env("WALNUT_TEST_LEASE_SECRET"),
        session_token: None,
        ca_file: None,
        timeout: Duration::from_secs(5),
        lock_dir: PathBuf::from(env("WALNUT_TEST_LEASE_DIR")),
        lease: Duration::from_secs(LEASE),
        credentials_file: None,
        config_file: None,
    })
    .unwrap();
    let _l = repo.lock(LOCK, LockMode::Exclusive, true).unwrap().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn s3_leases_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    lease_rules(&s);
}

#[test]
fn s3_leases_on_s3s_fs() {
    let Some(s) = S3Server::s3s_fs() else { return };
    lease_rules(&s);
}

// ---------------------------------------------------------------------------------------
// The server killed during a push and during a backup

fn killed_server(mut s: S3Server) {
    let fs = s.kind == Kind::S3sFs;
    let conf = s.config_file(3);
    let url = "s3://walnut/kill";
    let prefix = "kill";
    let dir = pg_tempdir("s3-kill");
    // 32 MiB segments of barely compressible WAL: a push is a multipart upload
    let mut pg = Pg::init(
        &pg_bin(),
        dir.path(),
        "primary",
        &["-k", "--wal-segsize=32"],
    );
    pg.append_conf("wal_keep_size = '2GB'\nmax_wal_size = '2GB'");
    ok(walnut_s3(&conf, &["init", "-B", url]), "init");
    let data = pg.data.to_str().unwrap().to_string();
    ok(
        walnut_s3(
            &conf,
            &["add-instance", "-B", url, "--instance", "db", "-D", &data],
        ),
        "add-instance",
    );
    pg.start();
    let start = pg.psql("postgres", "select pg_current_wal_lsn()");
    pg.psql(
        "postgres",
        "create table r as select md5(random()::text) || md5(random()::text) || \
         md5(random()::text) as t from generate_series(1, 700000)",
    );
    let seg = |k: u32| {
        pg.psql(
            "postgres",
            &format!("select pg_walfile_name('{start}'::pg_lsn + {k} * 33554432)"),
        )
    };
    let (s1, s2) = (seg(1), seg(2));
    pg.psql("postgres", "select pg_switch_wal()");
    let wal = pg.data.join("pg_wal");
    let repo = s.repo(prefix);
    let key = |n: &str| format!("instances/db/wal/00000001/{n}.lz4");

    // a push with the server up, timed; the next is killed half-way through as long
    let t0 = Instant::now();
    ok(push(&conf, url, &wal.join(&s1), &s1), "push");
    let took = t0.elapsed();
    let size = repo.head(&key(&s1)).unwrap().expect("pushed").size;
    assert!(
        size > 16 << 20,
        "segment compressed to {size}: not multipart"
    );
    let mut c = as_pg(walnut_bin("walnut-archive"));
    c.args([
        "-B",
        url,
        "--instance",
        "db",
        "--look-ahead",
        "0",
        "--config",
    ])
    .arg(&conf)
    .arg(wal.join(&s2))
    .arg(&s2)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(took / 2);
    s.kill();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // one error line naming the server (a warning may say the upload could not be aborted)
    let err = stderr(&o);
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains(&s.endpoint()), "{err}");
    s.start();
    // nothing partial is visible: no object, no listing entry, no file
    assert_eq!(repo.head(&key(&s2)).unwrap(), None);
    let listed = repo.list("instances/db/wal/00000001").unwrap();
    assert!(
        !listed.objects.iter().any(|o| o.name.starts_with(&s2)),
        "{listed:?}"
    );
    if fs {
        assert!(!s.data().join("walnut").join(prefix).join(key(&s2)).exists());
    }
    // back: the push succeeds and the segment comes back identical
    ok(push(&conf, url, &wal.join(&s2), &s2), "push after restart");
    let out = pg_mkdir(&dir.path().join("fetched"));
    let o = fetch(&conf, url, &s2, &out.join(&s2));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(std::fs::read(out.join(&s2)).unwrap() == std::fs::read(wal.join(&s2)).unwrap());

    // a backup with the server killed under it: ERROR once its lease is gone, and the next
    // backup works and restores
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {url} --config {} --instance db %p %f'\n",
        walnut_bin("walnut-archive").display(),
        conf.display()
    ));
    pg.stop();
    pg.start();
    pg.pgbench(&["-i", "-s", "6", "-q", "postgres"]);
    let mut args: Vec<String> = [
        "backup",
        "-B",
        url,
        "--instance",
        "db",
        "-b",
        "full",
        "-j",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(pg.conn_args());
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(&args)
        .arg("--config")
        .arg(&conf)
        .env("WALNUT_S3_LEASE_SECS", LEASE.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // kill once the backup has stored some of its files
    let t0 = Instant::now();
    let id = loop {
        let l = repo.list("instances/db/backups").unwrap();
        if let Some(id) = l.prefixes.first() {
            let files = repo
                .list(&format!("instances/db/backups/{id}/database/base"))
                .unwrap();
            if !files.prefixes.is_empty() {
                break id.clone();
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before the server could be killed"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no backup started");
        std::thread::sleep(Duration::from_millis(50));
    };
    s.kill();
    let t0 = Instant::now();
    let o = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the backup hangs with the server down"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!o.status.success(), "backup succeeded without its server");
    assert!(
        stderr(&o).contains(&s.endpoint()),
        "the error names the server: {}",
        stderr(&o)
    );
    s.start();
    // RUNNING while its lease lives (at most LEASE s), then ERROR
    let t0 = Instant::now();
    loop {
        let st = status(&conf, url, &id);
        if st == "ERROR" {
            break;
        }
        assert_eq!(st, "RUNNING", "backup {id}");
        assert!(
            t0.elapsed() < Duration::from_secs(LEASE + 30),
            "{id} still RUNNING"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let running = format!("instances/db/backups/{id}/.running");
    assert!(
        repo.lease_holders(&running).unwrap().is_empty(),
        "the dead backup's lease is gone once taken over"
    );
    // the next backup works and restores
    pg.pgbench(&["-t", "200", "-n", "postgres"]);
    let next = backup_s3(&conf, url, &pg, "full");
    assert_ne!(next, id);
    assert_eq!(status(&conf, url, &next), "OK");
    assert_eq!(status(&conf, url, &id), "ERROR");
    let dump = super::env::Env::dumpall(&pg);
    pg.psql("postgres", "select pg_create_restore_point('after_next')");
    pg.psql("postgres", "create table later as select 1 as i");
    pg.switch_and_wait_archived();
    restore_and_compare(&s, &conf, url, &pg, dir.path(), &next, "after_next", &dump);
    pg.stop();
}

#[test]
fn s3_server_killed_during_push_and_backup_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    killed_server(s);
}

#[test]
fn s3_server_killed_during_push_and_backup_on_s3s_fs() {
    let Some(s) = S3Server::s3s_fs() else { return };
    killed_server(s);
}

// ---------------------------------------------------------------------------------------
// Flipped bytes, metrics and check

fn corruption_metrics_check(s: S3Server) {
    let conf = s.config_file(5);
    let url = "s3://walnut/cm";
    let prefix = "cm";
    let dir = pg_tempdir("s3-cm");
    let mut pg = s3_primary(&conf, url, dir.path());
    let archive_command = format!(
        "{} -B {url} --config {} --instance db %p %f",
        walnut_bin("walnut-archive").display(),
        conf.display()
    );
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{archive_command}'\n"
    ));
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);

    // check: the settings, this catalog's archive_command, a switched segment archived
    let mut a: Vec<String> = ["check", "-B", url, "--instance", "db"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(pg.conn_args());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = ok(walnut_s3(&conf, &a), "check on S3");
    assert!(out.contains("archived and indexed"), "{out}");
    // an archive_command naming another catalog fails the check, naming it
    pg.psql(
        "postgres",
        &format!(
            "alter system set archive_command = '{}'",
            archive_command.replace("s3://walnut/cm", "s3://walnut/other")
        ),
    );
    pg.psql("postgres", "select pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    let o = walnut_s3(&conf, &a);
    assert!(!o.status.success());
    assert!(both(&o).contains("s3://walnut/other"), "{}", both(&o));
    pg.psql("postgres", "alter system reset archive_command");
    pg.psql("postgres", "select pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    let full = backup_s3(&conf, url, &pg, "full");
    pg.switch_and_wait_archived();

    // metrics: listed through the bucket. The archiver may still add an object (the
    // backup's history file, an index completed beside a pending one) while metrics runs;
    // nothing is removed meanwhile, so its figure lies between a listing before and after.
    let repo = s.repo(prefix);
    let catalog_bytes = || {
        let mut total = 0u64;
        let mut stack = vec!["instances/db".to_string()];
        while let Some(p) = stack.pop() {
            let l = repo.list(&p).unwrap();
            total += l.objects.iter().map(|o| o.size).sum::<u64>();
            stack.extend(l.prefixes.iter().map(|n| format!("{p}/{n}")));
        }
        total
    };
    let before = catalog_bytes();
    let m = ok(
        walnut_s3(&conf, &["metrics", "-B", url, "--instance", "db"]),
        "metrics on S3",
    );
    let after = catalog_bytes();
    let metric = |name: &str| -> f64 {
        let line = m
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{instance=\"db\"}}")))
            .unwrap_or_else(|| panic!("no {name} in\n{m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(before > 1 << 20, "{before}");
    let bytes = metric("walnut_catalog_bytes");
    assert!(
        before as f64 <= bytes && bytes <= after as f64,
        "walnut_catalog_bytes {bytes} not between the listings before ({before}) and after ({after}):\n{m}"
    );
    assert!(metric("walnut_archive_segments") >= 2.0, "{m}");
    assert_eq!(metric("walnut_archive_gaps"), 0.0, "{m}");
    assert!(
        m.contains("walnut_backup_last_size_bytes{instance=\"db\",mode=\"full\"}"),
        "{m}"
    );

    let validate = || walnut_s3(&conf, &["validate", "-B", url, "--instance", "db"]);
    ok(validate(), "validate of an intact backup");

    // a flipped byte in a WAL segment the backup needs: fetch 200, validate CORRUPT
    let row = show_rows(&conf, url)
        .into_iter()
        .find(|r| r["id"] == full.as_str())
        .unwrap();
    let start_lsn = row["start_lsn"].as_str().unwrap().to_string();
    let seg = pg.psql(
        "postgres",
        &format!("select pg_walfile_name('{start_lsn}')"),
    );
    let wkey = format!("instances/db/wal/00000001/{seg}.lz4");
    let original = repo.get(&wkey).unwrap().into_vec();
    replace_object(&s, &repo, prefix, &wkey, &damage(&original));
    let out = pg_mkdir(&dir.path().join("fetched"));
    let o = fetch(&conf, url, &seg, &out.join(&seg));
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));
    assert!(!out.join(&seg).exists());
    let o = validate();
    assert!(!o.status.success(), "validate passed a damaged segment");
    assert!(both(&o).contains(&seg), "{}", both(&o));
    assert_eq!(status(&conf, url, &full), "CORRUPT");
    replace_object(&s, &repo, prefix, &wkey, &original);
    ok(validate(), "validate with the segment put back");
    assert_eq!(status(&conf, url, &full), "OK");

    // a flipped byte in a stored data file: validate CORRUPT naming it
    let rel = pg.psql(
        "postgres",
        "select pg_relation_filepath('pgbench_accounts')",
    );
    let dkey = format!("instances/db/backups/{full}/database/{rel}");
    let original = repo
        .get(&dkey)
        .unwrap_or_else(|e| panic!("{dkey}: {e}"))
        .into_vec();
    replace_object(&s, &repo, prefix, &dkey, &damage(&original));
    let o = validate();
    assert!(!o.status.success(), "validate passed a damaged data file");
    assert!(both(&o).contains(&rel), "{}", both(&o));
    assert_eq!(status(&conf, url, &full), "CORRUPT");
    pg.stop();
}

#[test]
fn s3_flipped_bytes_metrics_and_check_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    corruption_metrics_check(s);
}

#[test]
fn s3_flipped_bytes_metrics_and_check_on_s3s_fs() {
    let Some(s) = S3Server::s3s_fs() else { return };
    corruption_metrics_check(s);
}
