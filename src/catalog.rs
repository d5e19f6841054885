//! The catalog: a directory that holds instances, their WAL archive and their backups.
//!
//! Layout (readable by a human in an emergency; metadata is JSON):
//! ```text
//! CATALOG/
//!   walnut-catalog.json                 {"format": 1}  (checked by Catalog::open)
//!   instances/NAME/instance.json        InstanceConfig
//!   instances/NAME/wal/                 the WAL archive (see crate::archive)
//!   instances/NAME/backups/ID/          one backup (see crate::backup)
//! ```
//! Everything below the catalog root is untrusted (the postgres OS user can write it): the
//! marker must be a regular file, not a link, holding a known format; backups are read
//! through crate::safepath (no links below the root, see backup::meta).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::{CatalogArgs, ConnArgs};
use crate::durable::{self, Replace};
use crate::error::{Error, IoContext, Result};
use crate::repo::{LocalRepo, Repo};

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

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
}

#[derive(Args, Debug, Clone)]
pub struct AddInstanceArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    #[arg(long)]
    pub instance: String,
    /// Data directory of the instance.
    #[arg(short = 'D', long = "pgdata", env = "PGDATA")]
    pub pgdata: PathBuf,
    #[command(flatten)]
    pub conn: ConnArgs,
}

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
        let marker = root.join(CATALOG_MARKER);
        let f = match crate::safepath::open_under(root, CATALOG_MARKER) {
            Ok(f) => f,
            Err(e) if e.kind() == crate::ErrorKind::NotFound => {
                return Err(Error::invalid(format!(
                    "\"{}\" is not a walnut catalog (no {CATALOG_MARKER}; run 'walnut init -B {}')",
                    root.display(),
                    root.display()
                )))
            }
            Err(e) => {
                return Err(Error::new(
                    e.kind(),
                    format!("catalog marker \"{}\": {e}", marker.display()),
                ))
            }
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, 4097), &mut bytes)
            .ctx("read", &marker)?;
        check_marker(&bytes).map_err(|why| {
            Error::corruption(format!(
                "\"{}\" is not a valid walnut catalog marker: {why}",
                marker.display()
            ))
        })?;
        Ok(Catalog {
            root: root.to_path_buf(),
            repo: local_repo(root)?,
        })
    }

    /// A catalog over any store (tests use [`crate::repo::MemRepo`]); `root` names it in
    /// messages and is the local directory for a local store.
    pub fn with_repo(root: &Path, repo: Arc<dyn Repo>) -> Catalog {
        Catalog {
            root: root.to_path_buf(),
            repo,
        }
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

    /// Creates a catalog in an empty or missing directory.
    pub fn init(root: &Path) -> Result<Catalog> {
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
        durable::create_dir_all_durable(&root.join("instances"))?;
        durable::write_file(&root.join(CATALOG_MARKER), MARKER_CONTENT, Replace::No)?;
        Ok(Catalog {
            root: root.to_path_buf(),
            repo: local_repo(root)?,
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

    /// Loads an instance's configuration.
    pub fn instance(&self, name: &str) -> Result<InstanceConfig> {
        check_instance_name(name)?;
        let p = self.instance_dir(name).join("instance.json");
        let bytes = std::fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!(
                    "instance \"{name}\" is not in catalog \"{}\" (run 'walnut add-instance')",
                    self.root.display()
                ))
            } else {
                Error::io("read", &p, e)
            }
        })?;
        let cfg: InstanceConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corruption(format!("{}: {e}", p.display())))?;
        cfg.check(name)
            .map_err(|why| Error::corruption(format!("{}: {why}", p.display())))?;
        Ok(cfg)
    }

    /// Names of all instances.
    pub fn instances(&self) -> Result<Vec<String>> {
        let dir = self.root.join("instances");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).ctx("read directory", &dir)? {
            let e = e.ctx("read directory", &dir)?;
            if e.path().join("instance.json").is_file() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Stores an instance's configuration, creating its directories.
    pub fn save_instance(&self, cfg: &InstanceConfig, replace: Replace) -> Result<()> {
        check_instance_name(&cfg.name)?;
        let dir = self.instance_dir(&cfg.name);
        durable::create_dir_all_durable(&dir)?;
        durable::create_dir_all_durable(&self.wal_dir(&cfg.name))?;
        durable::create_dir_all_durable(&self.backups_dir(&cfg.name))?;
        let mut json = serde_json::to_vec_pretty(cfg)?;
        json.push(b'\n');
        durable::write_file(&dir.join("instance.json"), &json, replace).map_err(|e| {
            if e.kind() == crate::ErrorKind::Conflict {
                Error::conflict(format!("instance \"{}\" already exists", cfg.name))
            } else {
                e
            }
        })
    }
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

pub fn run_init(args: InitArgs) -> Result<i32> {
    Catalog::init(&args.catalog.catalog)?;
    log::info!(
        "catalog initialised at \"{}\"",
        args.catalog.catalog.display()
    );
    Ok(0)
}

/// Reads `PGDATA/global/pg_control` and records what the archive and backups need to know
/// about the instance. Connection options not given fall back to PGHOST, PGPORT, PGUSER and
/// PGDATABASE, as in libpq.
pub fn run_add_instance(args: AddInstanceArgs) -> Result<i32> {
    let catalog = Catalog::open(&args.catalog.catalog)?;
    check_instance_name(&args.instance)?;
    let cfg = instance_config_from_pgdata(&args.instance, &args.pgdata, &args.conn.params())?;
    catalog.save_instance(&cfg, Replace::No)?;
    log::info!(
        "instance \"{}\" added: system id {}, PostgreSQL {}, {} MiB WAL segments, data checksums {}",
        cfg.name,
        cfg.system_id,
        cfg.pg_major,
        cfg.wal_segment_size >> 20,
        if cfg.data_checksums { "on" } else { "off" }
    );
    Ok(0)
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
}
