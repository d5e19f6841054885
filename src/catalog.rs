//! The catalog: a directory that holds instances, their WAL archive and their backups.
//! Every read and write goes through its repository ([`Catalog::repo`]), by key.
//!
//! Layout (readable by a human in an emergency; metadata is JSON):
//! ```text
//! CATALOG/
//!   walnut-catalog.json                 {"format": 1}  (checked by Catalog::open)
//!   instances/NAME/instance.json        {"format": 1, ...InstanceConfig}, written once by
//!                                       add-instance, never rewritten (files without
//!                                       "format", from earlier releases, read as format 1)
//!   instances/NAME/wal/                 the WAL archive (see crate::archive)
//!   instances/NAME/backups/ID/          one backup (see crate::backup)
//! ```
//! Everything below the catalog root is untrusted (the postgres OS user can write it): the
//! marker must be a regular file, not a link, holding a known format; backups are read
//! through crate::safepath (no links below the root, see backup::meta).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::repo::{CatalogLocation, LocalRepo, Repo, S3Repo};

pub const CATALOG_MARKER: &str = "walnut-catalog.json";
/// The catalog format this walnut reads and writes.
pub const CATALOG_FORMAT: u64 = 1;
/// What [`Catalog::init`] writes into the marker.
const MARKER_CONTENT: &[u8] = b"{\"format\": 1}\n";

/// Checks the marker's content: a JSON object whose `format` is [`CATALOG_FORMAT`] (other
/// members are ignored). Returns why not, for the caller's one-line error.
fn check_marker(bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() > 4096 {
        return Err("larger than 4096 bytes".into());
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("empty".into());
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
    let format = v
        .as_object()
        .ok_or("not a JSON object")?
        .get("format")
        .ok_or("no \"format\" member")?;
    match format.as_u64() {
        Some(CATALOG_FORMAT) => Ok(()),
        Some(f) => Err(format!(
            "catalog format {f} is not supported (this walnut reads format {CATALOG_FORMAT})"
        )),
        None => Err(format!("\"format\" is {format}, not a format number")),
    }
}

/// The `instance.json` format this walnut reads and writes.
pub const INSTANCE_FORMAT: u64 = 1;

/// What `add-instance` records about an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceConfig {
    pub name: String,
    pub system_id: u64,
    pub pg_major: u32,
    pub wal_segment_size: u32,
    pub wal_page_size: u32,
    pub block_size: u32,
    /// Blocks per relation segment file (RELSEG_SIZE), normally 131072.
    pub relseg_size: u32,
    pub data_checksums: bool,
    pub pgdata: PathBuf,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
}

impl InstanceConfig {
    /// Checks what was read from `instance.json` (catalog content is untrusted: a bad value
    /// must be a clear error, never a division by zero or a wrong answer later). `name` is the
    /// instance it was read for.
    pub fn check(&self, name: &str) -> std::result::Result<(), String> {
        let pow2_in = |v: u32, lo: u32, hi: u32| v.is_power_of_two() && (lo..=hi).contains(&v);
        if self.name != name {
            return Err(format!(
                "names instance \"{}\", expected \"{name}\"",
                self.name
            ));
        }
        if self.system_id == 0 {
            return Err("system_id 0 is not a database system identifier".into());
        }
        if crate::types::PgVersion::from_major(self.pg_major).is_none() {
            return Err(format!(
                "pg_major {} is not a supported PostgreSQL version (13 to 18)",
                self.pg_major
            ));
        }
        if !crate::types::valid_segment_size(self.wal_segment_size) {
            return Err(format!(
                "wal_segment_size {} is not a power of two from 1 MiB to 1 GiB",
                self.wal_segment_size
            ));
        }
        if !pow2_in(self.wal_page_size, 1024, 65536) {
            return Err(format!(
                "wal_page_size {} is not a power of two from 1 kB to 64 kB",
                self.wal_page_size
            ));
        }
        if !pow2_in(self.block_size, 1024, 32768) {
            return Err(format!(
                "block_size {} is not a power of two from 1 kB to 32 kB",
                self.block_size
            ));
        }
        if self.relseg_size == 0
            || u64::from(self.relseg_size) * u64::from(self.block_size) > 1 << 40
        {
            return Err(format!("relseg_size {} is invalid", self.relseg_size));
        }
        if !self.pgdata.is_absolute() {
            return Err(format!(
                "pgdata \"{}\" is not an absolute path",
                self.pgdata.display()
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Catalog {
    root: PathBuf,
    /// The storage every catalog read and write goes through.
    repo: Arc<dyn Repo>,
    /// For a remote catalog: the options that name it to walnut-fetch (restore_command).
    fetch_args: Option<String>,
}

/// Test hook: with this variable set, the catalog's store refuses deletes, as a WORM bucket
/// (Object Lock) does; the append-only test runs every command that way.
pub const REFUSE_DELETE_ENV: &str = "WALNUT_TEST_REFUSE_DELETE";

fn local_repo(root: &Path) -> Result<Arc<dyn Repo>> {
    Ok(Arc::new(
        LocalRepo::open(root)?
            .with_guard(CATALOG_MARKER)
            .refusing_delete(std::env::var_os(REFUSE_DELETE_ENV).is_some()),
    ))
}

impl Catalog {
    /// Opens an existing catalog, checking its marker file: it must be a regular file (not a
    /// symlink) holding `{"format": 1}`, as [`Catalog::init`] writes it.
    pub fn open(root: &Path) -> Result<Catalog> {
        refuse_url(root)?;
        let not_a_catalog = || {
            Error::invalid(format!(
                "\"{}\" is not a walnut catalog (no {CATALOG_MARKER}; run 'walnut init -B {}')",
                root.display(),
                root.display()
            ))
        };
        if !root.is_dir() && std::fs::symlink_metadata(root).is_err() {
            return Err(not_a_catalog());
        }
        let repo = local_repo(root)?;
        let marker = root.join(CATALOG_MARKER);
        let bytes = match repo.get(CATALOG_MARKER) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_a_catalog()),
            Err(e) => {
                return Err(Error::new(
                    e.kind(),
                    format!("catalog marker \"{}\": {e}", marker.display()),
                ))
            }
        };
        check_marker(&bytes).map_err(|why| {
            Error::corruption(format!(
                "\"{}\" is not a valid walnut catalog marker: {why}",
                marker.display()
            ))
        })?;
        Ok(Catalog {
            root: root.to_path_buf(),
            repo,
            fetch_args: None,
        })
    }

    /// Opens an existing catalog wherever it is: a directory ([`Catalog::open`]) or a
    /// bucket, whose marker object is checked the same way. On S3, what `init` probed
    /// (`walnut-s3.json`) decides whether creates use `If-None-Match` (absent: they do not).
    pub fn open_at(loc: &CatalogLocation) -> Result<Catalog> {
        let cfg = match loc {
            CatalogLocation::Local(p) => return Catalog::open(p),
            CatalogLocation::S3(c) => c,
        };
        let repo = S3Repo::new((**cfg).clone())?;
        let url = cfg.url();
        // The marker and the server probe record are read at once (one round trip, not two:
        // every walnut-archive and walnut-fetch call opens the catalog).
        let (marker, probe) = std::thread::scope(|s| {
            let probe = s.spawn(|| crate::repo::s3::read_probe(&repo));
            let marker = repo.get(CATALOG_MARKER);
            let probe = probe.join().unwrap_or_else(|_| {
                Err(Error::invalid(format!(
                    "\"{url}\": reading the server probe record panicked"
                )))
            });
            (marker, probe)
        });
        let bytes = match marker {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::invalid(format!(
                    "\"{url}\" is not a walnut catalog (no {CATALOG_MARKER}; run 'walnut init -B {url}')"
                )))
            }
            Err(e) => return Err(e),
        };
        check_marker(&bytes).map_err(|why| {
            Error::corruption(format!(
                "\"{url}/{CATALOG_MARKER}\" is not a valid walnut catalog marker: {why}"
            ))
        })?;
        if let Some(p) = probe? {
            repo.set_conditional(p.conditional_create);
        }
        Ok(Catalog {
            root: PathBuf::from(url),
            repo: Arc::new(repo),
            fetch_args: Some(cfg.fetch_args()),
        })
    }

    /// Creates a catalog wherever it is ([`Catalog::init`] for a directory). On S3 the
    /// prefix must hold nothing; walnut probes whether the server honours conditional
    /// create, records it in `walnut-s3.json` (create-only), then writes the marker.
    pub fn init_at(loc: &CatalogLocation) -> Result<Catalog> {
        let cfg = match loc {
            CatalogLocation::Local(p) => return Catalog::init(p),
            CatalogLocation::S3(c) => c,
        };
        let repo = S3Repo::new((**cfg).clone())?;
        let url = cfg.url();
        if repo.head(CATALOG_MARKER)?.is_some() {
            return Err(Error::conflict(format!(
                "\"{url}\" is already a walnut catalog"
            )));
        }
        let l = repo.list("")?;
        if !l.objects.is_empty() || !l.prefixes.is_empty() {
            return Err(Error::invalid(format!(
                "\"{url}\" is not empty; a catalog needs an empty prefix"
            )));
        }
        let conditional = repo.probe_conditional()?;
        log::info!(
            "{url}: the server {} conditional create (If-None-Match: *)",
            if conditional { "honours" } else { "ignores" }
        );
        repo.set_conditional(conditional);
        let probe = crate::repo::s3::S3Probe {
            format: 1,
            conditional_create: conditional,
        };
        let mut json = serde_json::to_vec_pretty(&probe)?;
        json.push(b'\n');
        repo.put_new(crate::repo::s3::S3_CONFIG_KEY, &json)?;
        repo.put_new(CATALOG_MARKER, MARKER_CONTENT).map_err(|e| {
            if e.kind() == ErrorKind::Conflict {
                Error::conflict(format!("\"{url}\" is already a walnut catalog"))
            } else {
                e
            }
        })?;
        Ok(Catalog {
            root: PathBuf::from(url),
            repo: Arc::new(repo),
            fetch_args: Some(cfg.fetch_args()),
        })
    }

    /// A catalog over any store (tests use [`crate::repo::MemRepo`]); `root` names it in
    /// messages and is the local directory for a local store.
    pub fn with_repo(root: &Path, repo: Arc<dyn Repo>) -> Catalog {
        Catalog {
            root: root.to_path_buf(),
            repo,
            fetch_args: None,
        }
    }

    /// For a remote catalog, the options that name it to `walnut-fetch` (`-B URL` and its
    /// settings); `None` for a local one.
    pub fn fetch_args(&self) -> Option<&str> {
        self.fetch_args.as_deref()
    }

    /// The store of this catalog.
    pub fn repo(&self) -> &dyn Repo {
        &*self.repo
    }

    /// The store, shared (for threads).
    pub fn repo_arc(&self) -> Arc<dyn Repo> {
        self.repo.clone()
    }

    /// Key of an instance's directory: `instances/NAME`.
    pub fn instance_key(name: &str) -> String {
        format!("instances/{name}")
    }

    /// Key prefix of an instance's WAL archive: `instances/NAME/wal`.
    pub fn wal_key(name: &str) -> String {
        format!("instances/{name}/wal")
    }

    /// Key prefix of an instance's backups: `instances/NAME/backups`.
    pub fn backups_key(name: &str) -> String {
        format!("instances/{name}/backups")
    }

    /// Key prefix of one backup: `instances/NAME/backups/ID`.
    pub fn backup_key(name: &str, id: &str) -> String {
        format!("instances/{name}/backups/{id}")
    }

    /// Creates a catalog in an empty or missing directory: creates the directory (the one
    /// thing done outside the repository), then writes the marker through it, create-only.
    pub fn init(root: &Path) -> Result<Catalog> {
        refuse_url(root)?;
        if root.join(CATALOG_MARKER).exists() {
            return Err(Error::conflict(format!(
                "\"{}\" is already a walnut catalog",
                root.display()
            )));
        }
        if root.is_dir()
            && root
                .read_dir()
                .ctx("read directory", root)?
                .next()
                .is_some()
        {
            return Err(Error::invalid(format!(
                "\"{}\" is not empty; a catalog needs an empty directory",
                root.display()
            )));
        }
        crate::durable::create_dir_all_durable(root)?;
        let repo = local_repo(root)?;
        repo.put_new(CATALOG_MARKER, MARKER_CONTENT).map_err(|e| {
            if e.kind() == ErrorKind::Conflict {
                Error::conflict(format!(
                    "\"{}\" is already a walnut catalog",
                    root.display()
                ))
            } else {
                e
            }
        })?;
        Ok(Catalog {
            root: root.to_path_buf(),
            repo,
            fetch_args: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.root.join("instances").join(name)
    }

    /// The WAL archive directory of an instance.
    pub fn wal_dir(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("wal")
    }

    /// The backups directory of an instance.
    pub fn backups_dir(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("backups")
    }

    /// Key of an instance's configuration: `instances/NAME/instance.json`.
    pub fn instance_config_key(name: &str) -> String {
        format!("instances/{name}/instance.json")
    }

    /// Loads an instance's configuration.
    pub fn instance(&self, name: &str) -> Result<InstanceConfig> {
        check_instance_name(name)?;
        let key = Self::instance_config_key(name);
        let what = self.root.join(&key).display().to_string();
        let bytes = match self.repo.get(&key) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::not_found(format!(
                    "instance \"{name}\" is not in catalog \"{}\" (run 'walnut add-instance')",
                    self.root.display()
                )))
            }
            Err(e) => return Err(e),
        };
        let cfg =
            decode_instance(&bytes).map_err(|why| Error::corruption(format!("{what}: {why}")))?;
        cfg.check(name)
            .map_err(|why| Error::corruption(format!("{what}: {why}")))?;
        Ok(cfg)
    }

    /// Names of all instances (a damaged `instance.json` counts: reading it reports it).
    pub fn instances(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for n in self.repo.list("instances")?.prefixes {
            if check_instance_name(&n).is_err() {
                continue;
            }
            match self.repo.head(&Self::instance_config_key(&n)) {
                Ok(None) => {}
                Ok(Some(_)) | Err(_) => names.push(n),
            }
        }
        names.sort();
        Ok(names)
    }

    /// Stores a new instance's configuration, create-only: an instance that exists is
    /// [`ErrorKind::Conflict`] (its `instance.json` is never rewritten). In a local catalog
    /// the instance's `wal/` and `backups/` directories are created too, so that a missing
    /// archive directory is damage, not an empty archive.
    pub fn save_instance(&self, cfg: &InstanceConfig) -> Result<()> {
        check_instance_name(&cfg.name)?;
        self.repo
            .put_new(
                &Self::instance_config_key(&cfg.name),
                &encode_instance(cfg)?,
            )
            .map_err(|e| {
                if e.kind() == ErrorKind::Conflict {
                    Error::conflict(format!("instance \"{}\" already exists", cfg.name))
                } else {
                    e
                }
            })?;
        if let Some(root) = self.repo.local_root() {
            for k in [Self::wal_key(&cfg.name), Self::backups_key(&cfg.name)] {
                // 0o777 less the umask, as the directories always were.
                crate::safepath::create_dirs_under(root, &k, 0o777)?;
                crate::durable::fsync_dir(&root.join(Self::instance_key(&cfg.name)))?;
            }
        }
        Ok(())
    }
}

/// `s3://...` and other URLs are never a local directory ([`Catalog::open_at`] and
/// [`Catalog::init_at`] take them).
fn refuse_url(root: &Path) -> Result<()> {
    if root.to_str().is_some_and(|s| s.contains("://")) {
        return Err(Error::invalid(format!(
            "catalog \"{}\" is an URL, not a directory (this command takes a directory here)",
            root.display()
        )));
    }
    Ok(())
}

/// `instance.json`: `{"format": 1, ...}` with the members of [`InstanceConfig`].
fn encode_instance(cfg: &InstanceConfig) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct File<'a> {
        format: u64,
        #[serde(flatten)]
        cfg: &'a InstanceConfig,
    }
    let mut json = serde_json::to_vec_pretty(&File {
        format: INSTANCE_FORMAT,
        cfg,
    })?;
    json.push(b'\n');
    Ok(json)
}

/// Reads `instance.json`: its `format` must be [`INSTANCE_FORMAT`]; a file without one (as
/// walnut wrote it before the member existed) is format 1.
fn decode_instance(bytes: &[u8]) -> std::result::Result<InstanceConfig, String> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let obj = v.as_object_mut().ok_or("not a JSON object")?;
    match obj.remove("format") {
        None => {}
        Some(f) if f.as_u64() == Some(INSTANCE_FORMAT) => {}
        Some(f) => {
            return Err(format!(
                "instance.json format {f} is not supported (this walnut reads format {INSTANCE_FORMAT})"
            ))
        }
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// Instance names become directory names: keep them to a safe alphabet.
pub fn check_instance_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid instance name \"{name}\": use letters, digits, '_', '-' and '.'"
        )))
    }
}

/// Registers an instance: reads `PGDATA/global/pg_control` and records what the archive
/// and backups need to know about it. Connection settings not given fall back to PGHOST,
/// PGPORT, PGUSER and PGDATABASE, as in libpq.
pub fn add_instance(
    catalog: &Catalog,
    name: &str,
    pgdata: &Path,
    conn: &crate::server::ConnParams,
) -> Result<InstanceConfig> {
    check_instance_name(name)?;
    let cfg = instance_config_from_pgdata(name, pgdata, conn)?;
    catalog.save_instance(&cfg)?;
    Ok(cfg)
}

/// Builds an instance's configuration from its data directory and connection options.
pub fn instance_config_from_pgdata(
    name: &str,
    pgdata: &Path,
    conn: &crate::server::ConnParams,
) -> Result<InstanceConfig> {
    let control = crate::pgcontrol::ControlFile::read_from_pgdata(pgdata)?;
    let pg_major = crate::pgcontrol::read_pg_version_file(pgdata)?;
    if crate::types::PgVersion::from_major(pg_major).is_none() {
        return Err(Error::invalid(format!(
            "\"{}\": PostgreSQL {pg_major} is not supported (13 to 18 are)",
            pgdata.display()
        )));
    }
    if !crate::types::valid_segment_size(control.wal_segment_size) {
        return Err(Error::corruption(format!(
            "\"{}\": pg_control gives an invalid WAL segment size {}",
            pgdata.display(),
            control.wal_segment_size
        )));
    }
    let pgdata = std::fs::canonicalize(pgdata).ctx("resolve", pgdata)?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let port = match conn.port {
        Some(p) => Some(p),
        None => match env("PGPORT") {
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| Error::invalid(format!("PGPORT=\"{p}\" is not a port number")))?,
            ),
            None => None,
        },
    };
    Ok(InstanceConfig {
        name: name.to_string(),
        system_id: control.system_id,
        pg_major,
        wal_segment_size: control.wal_segment_size,
        wal_page_size: control.wal_page_size,
        block_size: control.block_size,
        relseg_size: control.relseg_size,
        data_checksums: control.data_checksums(),
        pgdata,
        host: conn.host.clone().or_else(|| env("PGHOST")),
        port,
        user: conn.user.clone().or_else(|| env("PGUSER")),
        dbname: conn.dbname.clone().or_else(|| env("PGDATABASE")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn init_writes_a_marker_that_open_accepts() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("cat");
        Catalog::init(&root).unwrap();
        assert_eq!(
            std::fs::read(root.join(CATALOG_MARKER)).unwrap(),
            b"{\"format\": 1}\n"
        );
        Catalog::open(&root).unwrap();
        // compact and with extra members: still format 1
        for ok in [
            &b"{\"format\":1}"[..],
            b" {\"format\": 1, \"note\": \"x\"}\n",
        ] {
            std::fs::write(root.join(CATALOG_MARKER), ok).unwrap();
            Catalog::open(&root).unwrap();
        }
    }

    #[test]
    fn a_bad_marker_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("cat");
        Catalog::init(&root).unwrap();
        let marker = root.join(CATALOG_MARKER);
        let cases: [(&[u8], &str); 7] = [
            (b"", "empty"),
            (b"\n", "empty"),
            (b"garbage", "not JSON"),
            (b"{\"format\":99}", "format 99 is not supported"),
            (b"{\"format\":\"1\"}", "not a format number"),
            (b"[1]", "not a JSON object"),
            (b"{}", "no \"format\""),
        ];
        for (content, why) in cases {
            std::fs::write(&marker, content).unwrap();
            let e = Catalog::open(&root).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corruption, "{content:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(why), "{content:?}: {msg}");
            assert!(msg.contains(&marker.display().to_string()), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        std::fs::write(&marker, vec![b' '; 5000]).unwrap();
        assert!(Catalog::open(&root).is_err());
        // a symlink to a good marker, and a directory, are refused too
        let good = d.path().join("good.json");
        std::fs::write(&good, b"{\"format\": 1}\n").unwrap();
        std::fs::remove_file(&marker).unwrap();
        std::os::unix::fs::symlink(&good, &marker).unwrap();
        let e = Catalog::open(&root).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(&marker).unwrap();
        std::fs::create_dir(&marker).unwrap();
        let e = Catalog::open(&root).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir(&marker).unwrap();
        let e = Catalog::open(&root).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
        assert!(e.to_string().contains("is not a walnut catalog"), "{e}");
    }

    fn cfg(name: &str) -> InstanceConfig {
        InstanceConfig {
            name: name.into(),
            system_id: 42,
            pg_major: 15,
            wal_segment_size: 16 << 20,
            wal_page_size: 8192,
            block_size: 8192,
            relseg_size: 131072,
            data_checksums: true,
            pgdata: "/pgdata".into(),
            host: None,
            port: Some(5433),
            user: None,
            dbname: None,
        }
    }

    #[test]
    fn instance_json_is_create_only_and_carries_its_format() {
        let repo = crate::repo::MemRepo::new().refusing_delete();
        let c = Catalog::with_repo(Path::new("/mem"), Arc::new(repo.clone()));
        c.save_instance(&cfg("db")).unwrap();
        let e = c.save_instance(&cfg("db")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
        let bytes = repo.get("instances/db/instance.json").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["format"], 1);
        assert_eq!(c.instance("db").unwrap(), cfg("db"));
        // as earlier releases wrote it: no "format" member
        let mut old = serde_json::to_vec_pretty(&cfg("old")).unwrap();
        old.push(b'\n');
        repo.put_new("instances/old/instance.json", &old).unwrap();
        assert_eq!(c.instance("old").unwrap(), cfg("old"));
        // a format this walnut does not know is refused, naming the file
        let mut v2 = serde_json::to_value(cfg("new")).unwrap();
        v2["format"] = 2.into();
        repo.put_new("instances/new/instance.json", v2.to_string().as_bytes())
            .unwrap();
        let e = c.instance("new").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption, "{e}");
        assert!(e.to_string().contains("format 2 is not supported"), "{e}");
        assert!(e.to_string().contains("instances/new/instance.json"), "{e}");
        assert_eq!(c.instance("nope").unwrap_err().kind(), ErrorKind::NotFound);
        // listing: directories with an instance.json
        repo.put_new("instances/stray/x", b"1").unwrap();
        assert_eq!(c.instances().unwrap(), ["db", "new", "old"]);
    }

    #[test]
    fn a_local_instance_gets_its_archive_and_backup_directories() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("cat");
        let c = Catalog::init(&root).unwrap();
        assert_eq!(c.instances().unwrap(), Vec::<String>::new());
        c.save_instance(&cfg("db")).unwrap();
        assert!(root.join("instances/db/wal").is_dir());
        assert!(root.join("instances/db/backups").is_dir());
        assert_eq!(c.instances().unwrap(), ["db"]);
        assert!(Catalog::init(&root).is_err());
        // a missing catalog directory is "not a catalog"
        let e = Catalog::open(&d.path().join("nothing")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    }
}
