//! The SQL side of a backup: connecting, checking the server, start and stop.
//!
//! The session that starts a non-exclusive backup must stay open and stop it itself; a
//! [`Session`] owns that connection.

use std::time::Duration;

use crate::catalog::InstanceConfig;
use crate::error::{Error, Result};
use crate::types::{Lsn, TimeLineId};

/// libpq-style connection settings; unset ones fall back to PGHOST, PGPORT, PGUSER,
/// PGDATABASE and then to the instance's stored configuration (see [`connect`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnParams {
    /// Host name, or socket directory when it starts with `/`.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
}

pub struct Session {
    client: postgres::Client,
    pub major: u32,
}

/// Host, port, user and database after the fallbacks: arguments first, then PG*
/// environment variables, then the instance's stored configuration.
struct Resolved {
    host: String,
    port: u16,
    user: String,
    dbname: String,
}

fn resolve(args: &ConnParams, cfg: &InstanceConfig) -> Resolved {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    Resolved {
        host: args
            .host
            .clone()
            .or_else(|| env("PGHOST"))
            .or_else(|| cfg.host.clone())
            .unwrap_or_else(|| "/var/run/postgresql".to_string()),
        port: args
            .port
            .or_else(|| env("PGPORT").and_then(|p| p.parse().ok()))
            .or(cfg.port)
            .unwrap_or(5432),
        user: args
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .or_else(|| cfg.user.clone())
            .unwrap_or_else(|| "postgres".to_string()),
        dbname: args
            .dbname
            .clone()
            .or_else(|| env("PGDATABASE"))
            .or_else(|| cfg.dbname.clone())
            .unwrap_or_else(|| "postgres".to_string()),
    }
}

/// The replication connection settings to the same server [`connect`] reaches.
pub fn repl_config(args: &ConnParams, cfg: &InstanceConfig) -> crate::replication::ReplConfig {
    let r = resolve(args, cfg);
    let mut c = crate::replication::ReplConfig::new(&r.host, r.port, &r.user);
    c.application_name = "walnut_backup".to_string();
    c
}

/// Connection settings: arguments first, then PG* environment variables, then the
/// instance's stored configuration.
pub fn connect(args: &ConnParams, cfg: &InstanceConfig) -> Result<Session> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Resolved {
        host,
        port,
        user,
        dbname,
    } = resolve(args, cfg);
    let mut c = postgres::Config::new();
    if host.starts_with('/') {
        c.host_path(&host);
    } else {
        c.host(&host);
    }
    c.port(port)
        .user(&user)
        .dbname(&dbname)
        .application_name("walnut backup")
        .connect_timeout(Duration::from_secs(30));
    if let Some(pw) = env("PGPASSWORD") {
        c.password(pw);
    }
    let mut client = c.connect(postgres::NoTls).map_err(|e| {
        Error::server(format!(
            "could not connect to server at host \"{host}\" port {port} as user \"{user}\": {e}"
        ))
    })?;
    let v: String = client
        .query_one("select current_setting('server_version_num')", &[])?
        .get(0);
    let num: u32 = v
        .parse()
        .map_err(|_| Error::server(format!("unexpected server_version_num '{v}'")))?;
    Ok(Session {
        client,
        major: num / 10000,
    })
}

fn parse_lsn(s: &str) -> Result<Lsn> {
    s.parse()
}

/// What `pg_backup_stop` returns.
pub struct StopResult {
    pub lsn: Lsn,
    pub labelfile: String,
    pub spcmapfile: String,
}

impl Session {
    /// The open connection, for callers with their own queries (`walnut check`).
    pub fn client(&mut self) -> &mut postgres::Client {
        &mut self.client
    }

    pub fn setting(&mut self, name: &str) -> Result<String> {
        let r = self
            .client
            .query_one("select current_setting($1)", &[&name])?;
        Ok(r.get(0))
    }

    pub fn system_identifier(&mut self) -> Result<u64> {
        let r = self.client.query_one(
            "select system_identifier::text from pg_control_system()",
            &[],
        )?;
        let s: String = r.get(0);
        s.parse()
            .map_err(|_| Error::server(format!("unexpected system identifier '{s}'")))
    }

    pub fn in_recovery(&mut self) -> Result<bool> {
        Ok(self
            .client
            .query_one("select pg_is_in_recovery()", &[])?
            .get(0))
    }

    /// Refuses servers whose settings cannot give a usable backup; returns whether the
    /// server is a standby (in recovery). A STREAM backup (`stream`) carries its own WAL,
    /// so archiving is not required; otherwise the server (or, for a standby, its
    /// primary: walnut cannot see it) must archive into this catalog, and a standby must
    /// have `archive_mode = always` to be checked here.
    pub fn check_backup(
        &mut self,
        cfg: &InstanceConfig,
        catalog_path: &std::path::Path,
        stream: bool,
    ) -> Result<bool> {
        if !(13..=18).contains(&self.major) {
            return Err(Error::server(format!(
                "PostgreSQL {} is not supported (13 to 18 are)",
                self.major
            )));
        }
        if self.major != cfg.pg_major {
            return Err(Error::server(format!(
                "server is PostgreSQL {}, instance \"{}\" was registered as {}",
                self.major, cfg.name, cfg.pg_major
            )));
        }
        let sysid = self.system_identifier()?;
        if sysid != cfg.system_id {
            return Err(Error::server(format!(
                "server's system identifier {sysid} is not instance \"{}\"'s ({}): wrong server",
                cfg.name, cfg.system_id
            )));
        }
        let wal_level = self.setting("wal_level")?;
        if wal_level != "replica" && wal_level != "logical" {
            return Err(Error::server(format!(
                "wal_level is '{wal_level}': backups need 'replica' or 'logical'"
            )));
        }
        let standby = self.in_recovery()?;
        if stream {
            return Ok(standby);
        }
        let mode = self.setting("archive_mode")?;
        if standby && mode != "always" {
            // The standby does not archive; its primary must (walnut waits for the
            // segments in its own archive, whoever puts them there).
            return Ok(true);
        }
        if mode != "on" && mode != "always" {
            return Err(Error::server(format!(
                "archive_mode is '{mode}': set archive_mode = on and archive_command to walnut-archive"
            )));
        }
        let cmd = self.setting("archive_command")?;
        let canonical =
            std::fs::canonicalize(catalog_path).unwrap_or_else(|_| catalog_path.to_path_buf());
        let mentions_catalog = cmd.contains(&*catalog_path.to_string_lossy())
            || cmd.contains(&*canonical.to_string_lossy());
        if !cmd.contains("walnut-archive") || !mentions_catalog || !cmd.contains(&cfg.name) {
            return Err(Error::server(format!(
                "archive_command '{cmd}' does not archive to this catalog: expected \
                 walnut-archive -B {} --instance {} %p %f",
                canonical.display(),
                cfg.name
            )));
        }
        Ok(standby)
    }

    /// Starts a non-exclusive backup with an immediate checkpoint; returns the start LSN.
    pub fn backup_start(&mut self, label: &str) -> Result<Lsn> {
        let sql = if self.major >= 15 {
            "select pg_backup_start($1, true)::text"
        } else {
            "select pg_start_backup($1, true, false)::text"
        };
        let s: String = self.client.query_one(sql, &[&label])?.get(0);
        parse_lsn(&s)
    }

    /// Timeline of the checkpoint the backup started from.
    pub fn checkpoint_timeline(&mut self) -> Result<TimeLineId> {
        let r = self
            .client
            .query_one("select timeline_id::int8 from pg_control_checkpoint()", &[])?;
        let t: i64 = r.get(0);
        Ok(t as TimeLineId)
    }

    /// Forces a WAL segment switch; returns the switch LSN.
    pub fn switch_wal(&mut self) -> Result<Lsn> {
        let s: String = self
            .client
            .query_one("select pg_switch_wal()::text", &[])?
            .get(0);
        parse_lsn(&s)
    }

    /// Stops the backup, waiting (up to `timeout`) until the server has archived the WAL
    /// it needs.
    pub fn backup_stop(&mut self, timeout: Duration) -> Result<StopResult> {
        let ms = timeout.as_millis().max(1);
        self.client
            .batch_execute(&format!("set statement_timeout = {ms}"))?;
        // wait_for_archive = false: the server still switches to a new segment so that the
        // one holding the stop LSN becomes archivable, but does not wait for the archiver,
        // whose wait loop sleeps a whole second between checks. The caller waits instead,
        // on walnut's own archive, which is the stronger check: the segments must be
        // durable in *this* catalog, not merely marked done by the server.
        let sql = if self.major >= 15 {
            "select lsn::text, labelfile, spcmapfile from pg_backup_stop(false)"
        } else {
            "select lsn::text, labelfile, spcmapfile from pg_stop_backup(false, false)"
        };
        let r = self.client.query_one(sql, &[]).map_err(|e| {
            let e = Error::from(e);
            Error::server(format!(
                "stopping the backup failed (timeout {} s): {e}",
                timeout.as_secs()
            ))
        })?;
        self.client.batch_execute("set statement_timeout = 0")?;
        let lsn: String = r.get(0);
        Ok(StopResult {
            lsn: parse_lsn(&lsn)?,
            labelfile: r.get(1),
            spcmapfile: r.get::<_, Option<String>>(2).unwrap_or_default(),
        })
    }

    /// Server clock as Unix seconds, and the next transaction id.
    pub fn now_and_next_xid(&mut self) -> Result<(i64, u64)> {
        let sql = if self.major >= 13 {
            "select extract(epoch from clock_timestamp())::float8, pg_snapshot_xmax(pg_current_snapshot())::text"
        } else {
            "select extract(epoch from clock_timestamp())::float8, txid_snapshot_xmax(txid_current_snapshot())::text"
        };
        let r = self.client.query_one(sql, &[])?;
        let t: f64 = r.get(0);
        let x: String = r.get(1);
        Ok((t.floor() as i64, x.parse().unwrap_or(0)))
    }

    pub fn data_directory(&mut self) -> Result<String> {
        self.setting("data_directory")
    }

    /// Approximate size of all databases, for progress.
    pub fn total_size(&mut self) -> Result<u64> {
        let r = self.client.query_one(
            "select coalesce(sum(pg_database_size(oid)),0)::int8 from pg_database",
            &[],
        )?;
        let n: i64 = r.get(0);
        Ok(n.max(0) as u64)
    }
}
