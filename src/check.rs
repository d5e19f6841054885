//! The checks behind `walnut check --instance NAME`: proves that a server archives into
//! this catalog. The library part: [`run`] returns a [`Report`]; `crate::cli::check`
//! parses the options and prints it.
//!
//! What people run after setup and after every configuration change (pgBackRest's
//! `check`). It verifies the settings that backups and recovery depend on, then forces a
//! WAL switch and waits for that very segment to be durable in the catalog and indexed,
//! so a broken `archive_command` shows up now and not at the next restore.
//!
//! Each check gives one [`CheckLine`]: `Ok`, `Notice` (worth knowing, not a failure) or
//! `Fail`; [`Report::ok`] is true only when nothing failed.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::archive::{IndexState, WalArchive};
use crate::catalog::{Catalog, InstanceConfig};
use crate::error::Result;
use crate::server::{self, ConnParams, Session};
use crate::types::WalFileName;

/// What to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The instance, as registered in the catalog.
    pub instance: String,
    /// How to reach its server (unset fields: the environment, then the stored ones).
    pub conn: ConnParams,
    /// How long to wait for the switched segment to be archived and indexed.
    pub archive_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Notice,
    Fail,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CheckLine {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

/// All checks of one run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub instance: String,
    pub ok: bool,
    pub checks: Vec<CheckLine>,
}

impl Report {
    fn push(&mut self, check: &'static str, status: Status, detail: impl Into<String>) {
        self.checks.push(CheckLine {
            check,
            status,
            detail: detail.into(),
        });
    }

    fn ok(&mut self, check: &'static str, detail: impl Into<String>) {
        self.push(check, Status::Ok, detail)
    }

    fn fail(&mut self, check: &'static str, detail: impl Into<String>) {
        self.push(check, Status::Fail, detail)
    }

    /// `ok` when `good`, else `fail`.
    fn expect(&mut self, check: &'static str, good: bool, detail: impl Into<String>) {
        let s = if good { Status::Ok } else { Status::Fail };
        self.push(check, s, detail)
    }

    /// How many checks failed.
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count()
    }
}

/// Checks `opts.instance` of `catalog`. An error only when the instance cannot be read
/// from the catalog; everything about the server is in the report.
pub fn run(catalog: &Catalog, opts: &CheckOptions) -> Result<Report> {
    let cfg = catalog.instance(&opts.instance)?;
    Ok(check(catalog, &cfg, &opts.conn, opts.archive_timeout))
}

/// Runs every check against the server; never stops at the first failure, so one run shows
/// everything that needs fixing (except that without a connection nothing else can run).
pub fn check(
    catalog: &Catalog,
    cfg: &InstanceConfig,
    conn: &ConnParams,
    timeout: Duration,
) -> Report {
    let mut r = Report {
        instance: cfg.name.clone(),
        ..Report::default()
    };
    match server::connect(conn, cfg) {
        Ok(mut s) => {
            r.ok("connection", format!("PostgreSQL {}", s.major));
            if let Err(e) = settings(&mut r, &mut s, catalog, cfg) {
                r.fail(
                    "settings",
                    format!("could not read the server's settings: {e}"),
                );
            }
            let standby = s.in_recovery().unwrap_or(false);
            if standby {
                r.push(
                    "archive",
                    Status::Notice,
                    "the server is a standby: it cannot switch WAL, so archiving is not tested",
                );
            } else if !r.checks.iter().any(|c| c.status == Status::Fail) {
                archive_round_trip(&mut r, &mut s, catalog, cfg, timeout);
            } else {
                r.push(
                    "archive",
                    Status::Notice,
                    "not tested: fix the failed checks first",
                );
            }
        }
        Err(e) => r.fail("connection", e.to_string()),
    }
    r.ok = !r.checks.iter().any(|c| c.status == Status::Fail);
    r
}

/// The settings: version, identity, WAL level, archiving, full-page writes, checksums.
fn settings(
    r: &mut Report,
    s: &mut Session,
    catalog: &Catalog,
    cfg: &InstanceConfig,
) -> Result<()> {
    r.expect(
        "version",
        s.major == cfg.pg_major && (13..=18).contains(&s.major),
        format!(
            "server is PostgreSQL {}, instance registered as {} (13 to 18 are supported)",
            s.major, cfg.pg_major
        ),
    );
    let sysid = s.system_identifier()?;
    r.expect(
        "system_identifier",
        sysid == cfg.system_id,
        if sysid == cfg.system_id {
            format!("{sysid}")
        } else {
            format!(
                "server's {sysid} is not instance \"{}\"'s {}: wrong server or wrong instance",
                cfg.name, cfg.system_id
            )
        },
    );
    let wal_level = s.setting("wal_level")?;
    r.expect(
        "wal_level",
        wal_level == "replica" || wal_level == "logical",
        format!("{wal_level} (replica or logical needed)"),
    );
    let standby = s.in_recovery()?;
    let mode = s.setting("archive_mode")?;
    let mode_ok = if standby {
        mode == "always"
    } else {
        mode == "on" || mode == "always"
    };
    r.expect(
        "archive_mode",
        mode_ok,
        if standby {
            format!("{mode} (a standby archives only with 'always')")
        } else {
            format!("{mode} ('on' or 'always' needed)")
        },
    );
    if s.major >= 15 {
        let lib = s.setting("archive_library")?;
        r.expect(
            "archive_library",
            lib.is_empty(),
            if lib.is_empty() {
                "not set (archive_command is used)".to_string()
            } else {
                format!("'{lib}' is set, so archive_command is ignored")
            },
        );
    }
    let cmd = s.setting("archive_command")?;
    let problem = match catalog.fetch_args() {
        None => archive_command_problem(&cmd, catalog.root(), &cfg.name),
        Some(ours) => {
            s3_archive_command_problem(&cmd, &catalog.root().to_string_lossy(), ours, &cfg.name)
        }
    };
    match problem {
        None => r.ok("archive_command", cmd),
        Some(p) => r.fail("archive_command", format!("'{cmd}': {p}")),
    }
    let fpw = s.setting("full_page_writes")?;
    r.expect(
        "full_page_writes",
        fpw == "on",
        format!("{fpw} (torn pages are repaired from full-page images only when on)"),
    );
    let sums = s.setting("data_checksums")?;
    if sums == "on" {
        r.ok("data_checksums", "on");
    } else {
        r.push(
            "data_checksums",
            Status::Notice,
            "off: backups cannot detect damaged pages (initdb -k or pg_checksums --enable)",
        );
    }
    Ok(())
}

/// Why `cmd` does not archive into `catalog` for `instance`, if it does not: it must run a
/// `walnut-archive` with `-B` naming this catalog, `--instance` naming this instance, and
/// pass `%p` and `%f`.
pub fn archive_command_problem(cmd: &str, catalog: &Path, instance: &str) -> Option<String> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let want = canon(catalog);
    command_problem(cmd, instance, want.display().to_string(), |b, _| {
        (canon(Path::new(b)) != want).then(|| {
            format!(
                "archives to catalog \"{b}\", not this one (\"{}\")",
                want.display()
            )
        })
    })
}

/// [`archive_command_problem`] for a catalog on S3: `-B` must name the same
/// `s3://BUCKET/PREFIX` and, where the command says which server (`--s3-endpoint`, or the
/// `s3-endpoint` of its `--config` file), the same endpoint as `ours` (the catalog's
/// `walnut-fetch` options, which carry `--s3-endpoint`).
pub fn s3_archive_command_problem(
    cmd: &str,
    url: &str,
    ours: &str,
    instance: &str,
) -> Option<String> {
    let norm = |u: &str| u.trim_end_matches('/').to_string();
    let words = shell_words(ours);
    let our_endpoint = words
        .iter()
        .position(|w| w == "--s3-endpoint")
        .and_then(|i| words.get(i + 1))
        .map(|e| norm(e));
    command_problem(cmd, instance, url.to_string(), |b, value| {
        if norm(b) != norm(url) {
            return Some(format!(
                "archives to catalog \"{b}\", not this one (\"{url}\")"
            ));
        }
        let theirs = match value("--s3-endpoint") {
            Some(e) => Some(norm(&e)),
            None => value("--config").and_then(|f| {
                crate::repo::location::config_setting(Path::new(&f), "s3-endpoint")
                    .ok()
                    .flatten()
                    .map(|e| norm(&e))
            }),
        };
        match (theirs, &our_endpoint) {
            (Some(t), Some(o)) if &t != o => Some(format!(
                "archives to S3 endpoint {t}, not this catalog's ({o})"
            )),
            _ => None,
        }
    })
}

/// The checks common to both: `walnut-archive` with `-B` (judged by `same_catalog`, given
/// the `-B` value and a look-up of other options), `--instance`, `%p` and `%f`.
fn command_problem(
    cmd: &str,
    instance: &str,
    want: String,
    same_catalog: impl Fn(&str, &dyn Fn(&str) -> Option<String>) -> Option<String>,
) -> Option<String> {
    let words = shell_words(cmd);
    let Some(at) = words
        .iter()
        .position(|w| Path::new(w).file_name().and_then(|n| n.to_str()) == Some("walnut-archive"))
    else {
        return Some("does not run walnut-archive".into());
    };
    let args = &words[at + 1..];
    let value = |short: Option<&str>, long: &str| -> Option<String> {
        let mut it = args.iter();
        while let Some(w) = it.next() {
            if Some(w.as_str()) == short || w == long {
                return it.next().cloned();
            }
            if let Some(v) = w.strip_prefix(&format!("{long}=")) {
                return Some(v.to_string());
            }
            if let Some(v) = short
                .and_then(|s| w.strip_prefix(s))
                .filter(|v| !v.is_empty())
            {
                return Some(v.to_string());
            }
        }
        None
    };
    match value(Some("-B"), "--backup-path") {
        Some(b) => {
            if let Some(p) = same_catalog(&b, &|long| value(None, long)) {
                return Some(p);
            }
        }
        // WALNUT_CATALOG in the server's environment is invisible from here.
        None => return Some(format!("no -B {want}: name the catalog in the command")),
    }
    match value(None, "--instance") {
        Some(i) if i == instance => {}
        Some(i) => return Some(format!("archives as instance \"{i}\", not \"{instance}\"")),
        None => return Some(format!("no --instance {instance}")),
    }
    if !args.iter().any(|w| w == "%p") || !args.iter().any(|w| w == "%f") {
        return Some("walnut-archive must get %p and %f".into());
    }
    None
}

/// Splits a command line on blanks, honouring single and double quotes (enough for
/// archive_command lines; no expansions).
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for ch in s.chars() {
        match quote {
            Some(q) if ch == q => quote = None,
            Some(_) => cur.push(ch),
            None if ch == '\'' || ch == '"' => {
                quote = Some(ch);
                any = true;
            }
            None if ch.is_whitespace() || ch == ';' || ch == '&' || ch == '|' => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            None => cur.push(ch),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Forces a WAL switch and waits until the finished segment is archived in the catalog and
/// indexed, or the archiver reports a failure for it, or `timeout` passes.
fn archive_round_trip(
    r: &mut Report,
    s: &mut Session,
    catalog: &Catalog,
    cfg: &InstanceConfig,
    timeout: Duration,
) {
    let ar = match WalArchive::open(catalog, &cfg.name) {
        Ok(a) => a,
        Err(e) => return r.fail("archive", e.to_string()),
    };
    // A message makes sure the current segment holds WAL, so the switch finishes a new
    // segment instead of returning the start of an empty one.
    let switched = s
        .client()
        .batch_execute("select pg_logical_emit_message(false, 'walnut', 'check')")
        .and_then(|_| {
            s.client().query_one(
                "select clock_timestamp()::text, pg_walfile_name(pg_switch_wal())",
                &[],
            )
        });
    let (started, seg): (String, String) = match switched {
        Ok(row) => (row.get(0), row.get(1)),
        Err(e) => return r.fail("archive", format!("could not switch WAL: {e}")),
    };
    let name: WalFileName = match seg.parse() {
        Ok(n) => n,
        Err(e) => return r.fail("archive", format!("server named segment '{seg}': {e}")),
    };
    let Some(segno) = name.segno(ar.seg_size()) else {
        return r.fail("archive", format!("'{seg}' is not a segment name"));
    };
    let t0 = Instant::now();
    loop {
        match ar.index_state(name.tli(), segno) {
            Ok(IndexState::Indexed(ix)) | Ok(IndexState::Pending(ix)) => {
                return r.ok(
                    "archive",
                    format!(
                        "segment {seg} archived and indexed ({} records) in {:.1} s",
                        ix.records,
                        t0.elapsed().as_secs_f64()
                    ),
                )
            }
            Ok(IndexState::Missing(why)) if !why.starts_with("not indexed yet") => {
                return r.fail(
                    "archive",
                    format!("segment {seg} archived but not indexed: {why}"),
                )
            }
            Ok(_) => {}
            Err(e) => return r.fail("archive", format!("segment {seg}: {e}")),
        }
        if let Some(f) = archiver_failure(s, &seg, &started) {
            return r.fail("archive", f);
        }
        if t0.elapsed() >= timeout {
            let detail = archiver_state(s)
                .map(|st| format!("; archiver: {st}"))
                .unwrap_or_default();
            return r.fail(
                "archive",
                format!(
                    "segment {seg} not archived and indexed within {} s{detail}",
                    timeout.as_secs()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The archiver's failure for `seg` since `since`, as pg_stat_archiver records it.
fn archiver_failure(s: &mut Session, seg: &str, since: &str) -> Option<String> {
    let row = s
        .client()
        .query_one(
            "select coalesce(last_failed_wal, ''), coalesce(last_failed_time::text, ''), \
             failed_count, coalesce(last_failed_time >= $1::text::timestamptz, false) \
             from pg_stat_archiver",
            &[&since],
        )
        .ok()?;
    let (wal, time, count, recent): (String, String, i64, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    (recent && wal == seg).then(|| {
        format!(
            "archive_command failed for {wal} at {time} (failed {count} times in all; its \
             message is in the server log)"
        )
    })
}

/// A summary of pg_stat_archiver.
fn archiver_state(s: &mut Session) -> Option<String> {
    let row = s
        .client()
        .query_one(
            "select coalesce(last_archived_wal, '-'), coalesce(last_failed_wal, '-'), \
             coalesce(last_failed_time::text, '-'), failed_count from pg_stat_archiver",
            &[],
        )
        .ok()?;
    let (ok, bad, t, n): (String, String, String, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    Some(format!(
        "last archived {ok}, last failed {bad} at {t}, {n} failures"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_archive_command_must_name_this_bucket_and_endpoint() {
        let ours = "-B s3://b/p --s3-endpoint http://127.0.0.1:9000 --s3-region r";
        let good = "/usr/bin/walnut-archive -B s3://b/p/ --instance db --config /x %p %f";
        assert_eq!(
            s3_archive_command_problem(good, "s3://b/p", ours, "db"),
            None
        );
        let same = "walnut-archive -B s3://b/p --s3-endpoint http://127.0.0.1:9000/ \
                    --instance db %p %f";
        assert_eq!(
            s3_archive_command_problem(same, "s3://b/p", ours, "db"),
            None
        );
        let other = "walnut-archive -B s3://b/q --instance db %p %f";
        assert!(s3_archive_command_problem(other, "s3://b/p", ours, "db")
            .unwrap()
            .contains("s3://b/q"));
        let elsewhere =
            "walnut-archive -B s3://b/p --s3-endpoint https://s3.aws --instance db %p %f";
        assert!(
            s3_archive_command_problem(elsewhere, "s3://b/p", ours, "db")
                .unwrap()
                .contains("https://s3.aws")
        );
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("w.conf");
        std::fs::write(&conf, "s3-endpoint = http://10.0.0.1:9000\n").unwrap();
        let via_conf = format!(
            "walnut-archive -B s3://b/p --config {} --instance db %p %f",
            conf.display()
        );
        assert!(
            s3_archive_command_problem(&via_conf, "s3://b/p", ours, "db")
                .unwrap()
                .contains("10.0.0.1")
        );
        assert!(s3_archive_command_problem("cp %p /x/%f", "s3://b/p", ours, "db").is_some());
    }

    #[test]
    fn archive_command_must_name_this_catalog_and_instance() {
        let cat = Path::new("/nonexistent/cat");
        let good = "/usr/bin/walnut-archive -B /nonexistent/cat --instance db %p %f";
        assert_eq!(archive_command_problem(good, cat, "db"), None);
        let quoted =
            "'/opt/w/walnut-archive' --backup-path='/nonexistent/cat' --instance=db \"%p\" %f";
        assert_eq!(archive_command_problem(quoted, cat, "db"), None);
        let other = "walnut-archive -B /nonexistent/other --instance db %p %f";
        assert!(archive_command_problem(other, cat, "db")
            .unwrap()
            .contains("not this one"));
        // A path that merely contains the catalog's path is another catalog.
        let longer = "walnut-archive -B /nonexistent/cat2 --instance db %p %f";
        assert!(archive_command_problem(longer, cat, "db").is_some());
        let inst = "walnut-archive -B /nonexistent/cat --instance db2 %p %f";
        assert!(archive_command_problem(inst, cat, "db")
            .unwrap()
            .contains("db2"));
        assert!(archive_command_problem("cp %p /arch/%f", cat, "db").is_some());
        let no_f = "walnut-archive -B /nonexistent/cat --instance db %p";
        assert!(archive_command_problem(no_f, cat, "db").is_some());
    }
}
