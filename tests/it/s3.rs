//! The catalog on a real S3 server: Garage 2.5.0 (the reference; it ignores conditional
//! writes) and s3s-fs 0.14.1 (which honours them). The servers are found in
//! /opt/walnut-tools/bin or on PATH (`.ci/run` installs them); each test starts its own on
//! 127.0.0.1 with a free port and a temp directory, and kills it by PID at the end, also
//! on failure. A missing binary skips the test with a message, except with CI=true.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walnut::repo::{Durability, Repo, S3Config, S3Repo};
use walnut::ErrorKind;

use super::harness::*;

const TOOLS: &str = "/opt/walnut-tools/bin";

pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
    let p = Path::new(TOOLS).join(name);
    if p.is_file() {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `None` (with a message) when the server is not installed; a failure under CI=true.
pub(super) fn missing(name: &str) -> Option<S3Server> {
    let msg = format!(
        "skipped: no {name} binary in {TOOLS} or PATH (.ci/run installs it with cargo install)"
    );
    // .ci/run names the servers it could not build: those tests skip, saying so. Any
    // other missing server under CI=true is a failure.
    let unbuilt = std::env::var("WALNUT_S3_UNAVAILABLE")
        .is_ok_and(|v| v.split_whitespace().any(|n| n == name));
    if unbuilt {
        eprintln!("{msg}; its build failed in .ci/run");
        return None;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("{msg}");
    None
}

pub(super) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(super) fn wait_port(port: u16, child: &mut Child, what: &str) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited at start: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{what} did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    S3sFs,
    Garage,
}

/// One S3 server with a bucket and a key that may use it.
pub(super) struct S3Server {
    pub kind: Kind,
    bin: PathBuf,
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub key: String,
    pub secret: String,
    pub bucket: String,
    pub region: String,
}

impl S3Server {
    pub(super) fn s3s_fs() -> Option<S3Server> {
        let Some(bin) = find_tool("s3s-fs") else {
            return missing("s3s-fs");
        };
        let dir = pg_tempdir("s3sfs");
        let mut s = S3Server {
            kind: Kind::S3sFs,
            bin,
            child: None,
            port: free_port(),
            key: "walnutkey".into(),
            secret: "walnutsecret0123456789".into(),
            bucket: "walnut".into(),
            region: "us-east-1".into(),
            dir,
        };
        // s3s-fs keeps one directory per bucket.
        std::fs::create_dir_all(s.data().join(&s.bucket)).unwrap();
        s.start();
        Some(s)
    }

    pub(super) fn garage() -> Option<S3Server> {
        let Some(bin) = find_tool("garage") else {
            return missing("garage");
        };
        let dir = pg_tempdir("garage");
        let rpc = free_port();
        let mut s = S3Server {
            kind: Kind::Garage,
            bin,
            child: None,
            port: free_port(),
            key: String::new(),
            secret: String::new(),
            bucket: "walnut".into(),
            region: "garage".into(),
            dir,
        };
        let d = s.dir.path().display().to_string();
        std::fs::write(
            s.conf(),
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{}\"\nroot_domain = \".s3.garage.localhost\"\n",
                "0123456789abcdef".repeat(4),
                s.port
            ),
        )
        .unwrap();
        s.start();
        // wait for the RPC side, then lay out one node with a key and a bucket
        let t0 = Instant::now();
        let id = loop {
            let out = s.garage_cmd(&["node", "id", "-q"]);
            if out.status.success() {
                let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
                break t.split('@').next().unwrap().to_string();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage node id: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // the RPC handlers of the layout can come up after `node id` answers (seen under
        // load: "No handler / shutting down"): assigning the same role again is harmless
        loop {
            let out = s.garage_cmd(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
            if out.status.success() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "garage layout assign: {out:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        s.garage_ok(&["layout", "apply", "--version", "1"]);
        let out = s.garage_ok(&["key", "create", "walnut-key"]);
        for line in out.lines() {
            let v = line.split_once(':').map(|(_, v)| v.trim().to_string());
            if line.contains("Key ID") {
                s.key = v.unwrap();
            } else if line.contains("Secret key") {
                s.secret = v.unwrap();
            }
        }
        assert!(
            !s.key.is_empty() && !s.secret.is_empty(),
            "garage key create: {out}"
        );
        s.garage_ok(&["key", "allow", "--create-bucket", "walnut-key"]);
        s.garage_ok(&["bucket", "create", "walnut"]);
        s.garage_ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "walnut",
            "--key",
            "walnut-key",
        ]);
        Some(s)
    }

    pub(super) fn conf(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    pub(super) fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(super) fn garage_cmd(&self, args: &[&str]) -> Output {
        run(Command::new(&self.bin)
            .arg("-c")
            .arg(self.conf())
            .args(args))
    }

    pub(super) fn garage_ok(&self, args: &[&str]) -> String {
        ok(self.garage_cmd(args), &format!("garage {args:?}"))
    }

    pub(super) fn start(&mut self) {
        let mut c = Command::new(&self.bin);
        match self.kind {
            Kind::S3sFs => {
                c.args(["--host", "127.0.0.1", "--port"])
                    .arg(self.port.to_string())
                    .args(["--access-key", &self.key, "--secret-key", &self.secret])
                    .arg(self.data());
            }
            Kind::Garage => {
                c.arg("-c").arg(self.conf()).arg("server");
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        c.stdout(log.try_clone().unwrap()).stderr(log);
        c.env("RUST_LOG", "warn");
        let mut child = c.spawn().expect("start S3 server");
        wait_port(self.port, &mut child, &format!("{:?}", self.kind));
        self.child = Some(child);
    }

    /// Kills the server (by its PID) and waits for it.
    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(super) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A config file (readable by the postgres user) with the endpoint, region and a
    /// credentials file: what archive_command and restore_command use.
    pub(super) fn config_file(&self, timeout: u64) -> PathBuf {
        let creds = self.dir.path().join("credentials");
        std::fs::write(
            &creds,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key, self.secret
            ),
        )
        .unwrap();
        let conf = self.dir.path().join("walnut.conf");
        std::fs::write(
            &conf,
            format!(
                "s3-endpoint = {}\ns3-region = {}\ns3-credentials = {}\ns3-timeout = {timeout}\n",
                self.endpoint(),
                self.region,
                creds.display()
            ),
        )
        .unwrap();
        chown_pg(self.dir.path());
        conf
    }

    pub(super) fn repo(&self, prefix: &str) -> S3Repo {
        S3Repo::new(S3Config {
            endpoint: self.endpoint(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            path_style: true,
            access_key: self.key.clone(),
            secret_key: self.secret.clone(),
            session_token: None,
            ca_file: None,
            timeout: Duration::from_secs(5),
            lock_dir: self.dir.path().join("locks"),
            lease: walnut::repo::s3::DEFAULT_LEASE,
            credentials_file: None,
            config_file: None,
        })
        .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The repository rules, multipart uploads and create-only, on one server.
fn repo_rules(s: &S3Server) {
    let conditional = s.kind == Kind::S3sFs;
    let probe = s.repo("probe");
    assert_eq!(
        probe.probe_conditional().unwrap(),
        conditional,
        "{:?}",
        s.kind
    );
    // the shared conformance suite, in both create modes where the server allows
    for (prefix, cond) in [("conf-head", false), ("conf-cond", true)] {
        if cond && !conditional {
            continue;
        }
        let r = s.repo(prefix);
        r.set_conditional(cond);
        walnut::repo::conformance::run(&r);
    }
    // create-only holds even on a server that ignores If-None-Match (the HEAD path)
    let r = s.repo("co");
    r.set_conditional(conditional);
    r.put_new("x/one", b"first").unwrap();
    let e = r.put_new("x/one", b"second").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(e.to_string().contains("bucket walnut key co/x/one"), "{e}");
    assert_eq!(&*r.get("x/one").unwrap(), b"first");
    // a multipart object (20 MiB: three parts), read whole and across a part boundary
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let mut w = r.create("x/big").unwrap();
    for c in big.chunks(1 << 20) {
        w.write_all(c).unwrap();
    }
    w.commit(Durability::Now).unwrap();
    assert!(*r.get("x/big").unwrap() == *big);
    let off = (8 << 20) - 10;
    assert_eq!(
        r.get_range("x/big", off, 20).unwrap(),
        &big[off as usize..][..20]
    );
    assert_eq!(r.head("x/big").unwrap().unwrap().size, big.len() as u64);
    // a second multipart create of the key is refused and leaves the first
    let mut w = r.create("x/big").unwrap();
    let e = w
        .write_all(&big)
        .map_err(|e| e.to_string())
        .and_then(|()| w.commit(Durability::Now).map_err(|e| e.to_string()))
        .unwrap_err();
    assert!(e.contains("already exists"), "{e}");
    let e = r.put_new("x/big", &big).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(*r.get("x/big").unwrap() == *big);
    // an upload dropped half-way leaves nothing (the multipart upload is aborted)
    let mut w = r.create("x/half").unwrap();
    w.write_all(&big).unwrap();
    drop(w);
    assert_eq!(r.head("x/half").unwrap(), None);
    assert!(r
        .list("x")
        .unwrap()
        .objects
        .iter()
        .all(|o| o.name != "half"));
    // a definite 404 is NotFound; a missing bucket is not
    assert_eq!(r.get("x/none").unwrap_err().kind(), ErrorKind::NotFound);
    let mut nb = s.repo("p").config().clone();
    nb.bucket = "no-such-bucket".into();
    let nb = S3Repo::new(nb).unwrap();
    let e = nb.list("").unwrap_err();
    assert_ne!(e.kind(), ErrorKind::NotFound, "{e}");
    if s.kind == Kind::Garage {
        // (s3s-fs answers NoSuchKey there; the catalog's marker is read first anyway)
        let e = nb.get("x").unwrap_err();
        assert_ne!(e.kind(), ErrorKind::NotFound, "{e}");
    }
    // listing pages (more than one page of 1000 keys is slow here: 1100 small objects)
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let r = Arc::new(s.repo("many"));
            std::thread::spawn(move || {
                for i in (t..1100).step_by(4) {
                    r.put_new(&format!("d/{i:05}"), b"x").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let l = s.repo("many").list("d").unwrap();
    assert_eq!(l.objects.len(), 1100);
    assert_eq!(l.objects[1099].name, "01099");
}

#[test]
fn s3_repo_rules_on_s3s_fs() {
    let Some(s) = S3Server::s3s_fs() else { return };
    repo_rules(&s);
}

#[test]
fn s3_repo_rules_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    repo_rules(&s);
}

pub(super) fn walnut_s3(conf: &Path, args: &[&str]) -> Output {
    let mut c = as_pg(walnut_bin("walnut"));
    c.args(args).arg("--config").arg(conf);
    run(&mut c)
}

pub(super) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(super) fn fetch(conf: &Path, url: &str, name: &str, dest: &Path) -> Output {
    let mut c = as_pg(walnut_bin("walnut-fetch"));
    c.args(["-B", url, "--instance", "db", "--prefetch", "0", "--config"])
        .arg(conf)
        .arg(name)
        .arg(dest);
    run(&mut c)
}

pub(super) fn push(conf: &Path, url: &str, path: &Path, name: &str) -> Output {
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
    .arg(conf)
    .arg(path)
    .arg(name);
    run(&mut c)
}

/// Locations: an unknown scheme is an error and creates nothing; wrong credentials give
/// one line naming the endpoint and never the secret; init records the probe.
#[test]
fn s3_locations_credentials_and_init_probe() {
    let cwd = pg_tempdir("s3-scheme");
    for bad in ["foo://b/p", "s3://B/p"] {
        let mut c = as_pg(walnut_bin("walnut"));
        c.current_dir(cwd.path()).args(["init", "-B", bad]);
        let o = run(&mut c);
        assert!(!o.status.success(), "{bad} accepted");
        let e = stderr(&o);
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        assert!(e.contains(bad), "{e}");
    }
    // without S3 settings an s3:// location is still never a directory
    let mut c = as_pg(walnut_bin("walnut"));
    c.current_dir(cwd.path())
        .args(["init", "-B", "s3://bkt/p"])
        .env_remove("AWS_ACCESS_KEY_ID");
    assert!(!run(&mut c).status.success());
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0);

    let Some(s) = S3Server::s3s_fs() else { return };
    let conf = s.config_file(5);
    let url = "s3://walnut/cat";
    // wrong credentials: one line naming the endpoint, no secret
    let mut c = as_pg(walnut_bin("walnut"));
    c.args([
        "init",
        "-B",
        url,
        "--s3-endpoint",
        &s.endpoint(),
        "--s3-timeout",
        "3",
    ])
    .env("AWS_ACCESS_KEY_ID", &s.key)
    .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value");
    let o = run(&mut c);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains(&s.endpoint()) && e.contains("403"), "{e}");
    assert!(!e.contains("wrong-secret-value"), "{e}");
    // init writes the probe result and the marker; a second init is refused
    ok(walnut_s3(&conf, &["init", "-B", url]), "init on s3");
    let r = s.repo("cat");
    let probe: serde_json::Value =
        serde_json::from_slice(&r.get("walnut-s3.json").unwrap()).unwrap();
    assert_eq!(probe["conditional_create"], true, "{probe}");
    assert!(r.head("walnut-catalog.json").unwrap().is_some());
    let o = walnut_s3(&conf, &["init", "-B", url]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already a walnut catalog"),
        "{}",
        stderr(&o)
    );
    // WALNUT_CATALOG names it too
    let mut c = as_pg(walnut_bin("walnut"));
    c.args([
        "add-instance",
        "--instance",
        "db",
        "-D",
        "/nonexistent",
        "--config",
    ])
    .arg(&conf)
    .env("WALNUT_CATALOG", url);
    let o = run(&mut c);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent"), "{}", stderr(&o));
}

/// archive_command to an s3:// catalog under pgbench; every segment fetched back
/// identical; fetch 1 for a definite 404, 200 with the server down or a flipped byte;
/// archive 1 with the server down, then success once it is back, nothing partial.
#[test]
fn s3_archive_and_fetch_under_pgbench() {
    let Some(s) = S3Server::s3s_fs() else { return };
    archive_scenario(s);
}

#[test]
fn s3_archive_and_fetch_under_pgbench_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    archive_scenario(s);
}

/// A PostgreSQL 15 primary in `dir` (data checksums, 1 MiB segments), not started, added
/// as instance `db` to the S3 catalog `url`, which is initialised here.
/// Makes `pg` archive into instance `db` of the S3 catalog `url` (walnut-archive with
/// `conf`); takes effect at its next start.
pub(super) fn archive_to_s3(pg: &mut Pg, conf: &Path, url: &str) {
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {url} --config {} --instance db %p %f'\n",
        walnut_bin("walnut-archive").display(),
        conf.display()
    ));
}

/// `walnut restore -j 2` of backup `id` of instance `db` from the S3 catalog `url` into
/// `target`, with `extra` options.
pub(super) fn restore_s3(
    conf: &Path,
    url: &str,
    id: &str,
    target: &Path,
    extra: &[&str],
) -> Output {
    let t = target.to_str().unwrap();
    let mut a = vec![
        "restore",
        "-B",
        url,
        "--instance",
        "db",
        "-i",
        id,
        "-D",
        t,
        "-j",
        "2",
    ];
    a.extend_from_slice(extra);
    walnut_s3(conf, &a)
}

/// [`walnut_s3`] with `pg`'s connection options after `args`.
pub(super) fn walnut_s3_on(conf: &Path, pg: &Pg, args: &[&str]) -> Output {
    let conn = pg.conn_args();
    let mut a: Vec<&str> = args.to_vec();
    a.extend(conn.iter().map(String::as_str));
    walnut_s3(conf, &a)
}

pub(crate) fn s3_primary(conf: &Path, url: &str, dir: &Path) -> Pg {
    let pg = Pg::init(&pg_bin(), dir, "primary", &["-k", "--wal-segsize=1"]);
    ok(walnut_s3(conf, &["init", "-B", url]), "init");
    let data = pg.data.to_str().unwrap().to_string();
    ok(
        walnut_s3(
            conf,
            &["add-instance", "-B", url, "--instance", "db", "-D", &data],
        ),
        "add-instance",
    );
    pg
}

fn archive_scenario(mut s: S3Server) {
    let fs = s.kind == Kind::S3sFs;
    let conf = s.config_file(3);
    let url = "s3://walnut/cat";
    let dir = pg_tempdir("s3-arch");
    let mut pg = s3_primary(&conf, url, dir.path());
    pg.append_conf(&format!(
        "archive_mode = on\narchive_command = '{} -B {url} --config {} --instance db %p %f'\n\
         wal_keep_size = '2GB'\nmax_wal_size = '2GB'",
        walnut_bin("walnut-archive").display(),
        conf.display()
    ));
    pg.start();
    pg.pgbench(&["-i", "-s", "3", "-q", "postgres"]);
    pg.pgbench(&["-c", "4", "-j", "2", "-T", "8", "-n", "postgres"]);
    pg.switch_and_wait_archived();
    let failed = pg.psql("postgres", "select failed_count from pg_stat_archiver");
    assert_eq!(failed, "0", "archive failures\n{}", pg.server_log());
    let r = s.repo("cat");
    // init recorded what the server does with If-None-Match (Garage ignores it)
    let probe: serde_json::Value =
        serde_json::from_slice(&r.get("walnut-s3.json").unwrap()).unwrap();
    assert_eq!(probe["conditional_create"], fs, "{probe}");
    let names: Vec<String> = r
        .list("instances/db/wal/00000001")
        .unwrap()
        .objects
        .into_iter()
        .filter_map(|o| o.name.strip_suffix(".lz4").map(str::to_string))
        .filter(|n| n.len() == 24)
        .collect();
    assert!(names.len() > 10, "only {} segments: {names:?}", names.len());
    let out = pg_mkdir(&dir.path().join("fetched"));
    let mut compared = 0;
    for n in &names {
        let Ok(orig) = std::fs::read(pg.data.join("pg_wal").join(n)) else {
            continue;
        };
        let dest = out.join(n);
        ok(fetch(&conf, url, n, &dest), "walnut-fetch");
        assert!(std::fs::read(&dest).unwrap() == orig, "{n} differs");
        compared += 1;
    }
    assert!(compared > 10, "compared only {compared}");
    // show --archive --verify reads the archive on S3
    ok(
        walnut_s3(
            &conf,
            &[
                "show",
                "-B",
                url,
                "--instance",
                "db",
                "--archive",
                "--verify",
            ],
        ),
        "show --archive --verify",
    );

    // the server down: archive 1 (PostgreSQL retries), fetch 200 (never "absent"),
    // both within the timeout; nothing of the segment is stored
    s.kill();
    // (WAL written first: a switch of an empty segment would archive nothing)
    pg.psql("postgres", "create table s3_down as select 1 as i");
    let seg = pg.psql("postgres", "select pg_walfile_name(pg_switch_wal())");
    let t0 = Instant::now();
    let o = push(&conf, url, &pg.data.join("pg_wal").join(&seg), &seg);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&s.endpoint()), "{}", stderr(&o));
    let o = fetch(&conf, url, &names[0], &out.join("down"));
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let t0 = Instant::now();
    while pg.psql("postgres", "select failed_count from pg_stat_archiver") == "0" {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "archiver never failed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // (s3s-fs keeps one file per object: nothing of the segment is there)
    let stored_dir = s.data().join("walnut/cat/instances/db/wal/00000001");
    if fs {
        assert!(!stored_dir.join(format!("{seg}.lz4")).exists());
    }
    // back: the archiver's retry succeeds and the segment comes back identical
    s.start();
    pg.wait_archived(&seg);
    let o = fetch(&conf, url, &seg, &out.join("back"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        std::fs::read(out.join("back")).unwrap()
            == std::fs::read(pg.data.join("pg_wal").join(&seg)).unwrap()
    );
    pg.stop();

    // a definite 404: exit 1
    let o = fetch(&conf, url, "0000000100000000000000F0", &out.join("x"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    if !fs {
        return;
    }
    // a flipped byte in a stored segment object (s3s-fs's file): 200, nothing written
    let victim = &names[1];
    let stored = stored_dir.join(format!("{victim}.lz4"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&stored, &bytes).unwrap();
    let o = fetch(&conf, url, victim, &out.join("flipped"));
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));
    assert!(!out.join("flipped").exists());
}

pub(super) fn backup_s3(conf: &Path, url: &str, pg: &Pg, mode: &str) -> String {
    let a = [
        "backup",
        "-B",
        url,
        "--instance",
        "db",
        "-b",
        mode,
        "-j",
        "2",
    ];
    ok(walnut_s3_on(conf, pg, &a), &format!("{mode} backup on S3"))
        .trim()
        .to_string()
}

/// Restores backup `id` from the S3 catalog into `target`, to the restore point `rp`,
/// starts it paused there and compares its pg_dumpall with `dump`.
#[allow(clippy::too_many_arguments)]
pub(super) fn restore_and_compare(
    s: &S3Server,
    conf: &Path,
    url: &str,
    pg: &Pg,
    dir: &Path,
    id: &str,
    rp: &str,
    dump: &str,
) {
    use super::env::{same_dump, wait_paused, Env};
    let target = dir.join(format!("restored-{rp}"));
    ok(
        restore_s3(
            conf,
            url,
            id,
            &target,
            &[
                "--recovery-target-name",
                rp,
                "--recovery-target-action",
                "pause",
            ],
        ),
        &format!("restore {id} from S3"),
    );
    let auto = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains(&format!("-B {url} --s3-endpoint")), "{auto}");
    assert!(!auto.contains(&s.secret), "{auto}");
    let sock = pg_mkdir(&dir.join(format!("sock-{rp}")));
    let mut r = pg.existing_like(&target, &sock);
    r.append_conf("archive_mode = off");
    r.start();
    wait_paused(&r);
    same_dump(
        &Env::dumpall(&r),
        dump,
        &format!("{id} restored from S3 to {rp}"),
    );
    r.stop();
    let _ = std::fs::remove_dir_all(&target);
}

/// FULL → PAGE → DELTA on S3, each restored from S3 (ranged reads) to its own restore point,
/// replaying WAL through walnut-fetch from S3: the same pg_dumpall each time.
fn backup_scenario(s: S3Server) {
    use super::env::Env;
    let conf = s.config_file(10);
    let url = "s3://walnut/bk";
    let dir = pg_tempdir("s3-bk");
    let mut pg = s3_primary(&conf, url, dir.path());
    archive_to_s3(&mut pg, &conf, url);
    pg.start();
    pg.pgbench(&["-i", "-s", "2", "-q", "postgres"]);
    let mut points = Vec::new();
    for (mode, work) in [("full", "100"), ("page", "300"), ("delta", "300")] {
        pg.pgbench(&["-t", work, "-n", "postgres"]);
        let id = backup_s3(&conf, url, &pg, mode);
        let dump = Env::dumpall(&pg);
        let rp = format!("after_{mode}");
        pg.psql(
            "postgres",
            &format!("select pg_create_restore_point('{rp}')"),
        );
        pg.psql(
            "postgres",
            &format!("create table {rp}_marker as select 1 as i"),
        );
        points.push((id, rp, dump));
    }
    pg.switch_and_wait_archived();
    let shown = ok(
        walnut_s3(&conf, &["show", "-B", url, "--instance", "db"]),
        "show on S3",
    );
    for (id, _, _) in &points {
        assert!(shown.contains(id.as_str()), "{id} not in\n{shown}");
    }
    assert!(shown.contains("DELTA") && shown.contains("PAGE"), "{shown}");
    ok(
        walnut_s3(&conf, &["validate", "-B", url, "--instance", "db"]),
        "validate on S3",
    );
    for (id, rp, dump) in &points {
        restore_and_compare(&s, &conf, url, &pg, dir.path(), id, rp, dump);
    }
    pg.stop();
}

#[test]
fn s3_backup_page_restore() {
    let Some(s) = S3Server::s3s_fs() else { return };
    backup_scenario(s);
}

#[test]
fn s3_backup_page_restore_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    backup_scenario(s);
}
