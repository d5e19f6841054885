//! Records of verification runs (`validate`, later `verify-restore`), for monitoring.
//!
//! Each run leaves one new file `<instance dir>/verify/<kind>-<YYYYMMDDTHHMMSSZ>[-n].json`,
//! created durably and never rewritten: the directory is an append-only log, so a crash
//! can lose at most the record being written, never an older one. `walnut metrics` reads
//! the newest record of each kind.
//!
//! Recording is best effort for the caller's purpose (a validate result stands whether or
//! not its record could be written), but its errors are reported, never hidden.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};

/// Kinds of verification that leave records.
pub const KINDS: [&str; 2] = ["validate", "verify-restore"];

const FORMAT: u32 = 1;
/// A record is a few hundred bytes; anything much larger is not one of ours.
const MAX_RECORD: u64 = 1 << 20;

/// One verification run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub kind: String,
    pub instance: String,
    pub success: bool,
    /// When the run ended, Unix seconds.
    pub time: i64,
    /// The same, human-readable (UTC).
    pub time_utc: String,
    /// What was verified and what was found.
    pub detail: serde_json::Value,
}

/// The key prefix of an instance's verification records.
fn verify_key(instance: &str) -> String {
    format!("{}/verify", Catalog::instance_key(instance))
}

fn check_kind(kind: &str) -> Result<()> {
    if KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "unknown verification kind \"{kind}\" (known: {})",
            KINDS.join(", ")
        )))
    }
}

/// "YYYYMMDDTHHMMSSZ" for Unix seconds.
fn stamp(secs: i64) -> String {
    // format_utc gives "YYYY-MM-DD HH:MM:SS+00".
    let t = crate::backup::meta::format_utc(secs);
    let digits: String = t[..19].chars().filter(|c| c.is_ascii_digit()).collect();
    format!("{}T{}Z", &digits[..8], &digits[8..])
}

/// Parses a record file name of `kind` into (stamp, n) for ordering; None for other files.
fn parse_name(name: &str, kind: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix(kind)?.strip_prefix('-')?;
    let rest = rest.strip_suffix(".json")?;
    let (st, n) = match rest.split_once('-') {
        Some((st, n)) => (st, n.parse::<u32>().ok()?),
        None => (rest, 0),
    };
    let ok = st.len() == 16
        && st.as_bytes()[8] == b'T'
        && st.ends_with('Z')
        && st[..8]
            .bytes()
            .chain(st[9..15].bytes())
            .all(|b| b.is_ascii_digit());
    ok.then(|| (st.to_string(), n))
}

/// Writes a new record of a `kind` run on `instance`.
pub fn record(
    catalog: &Catalog,
    instance: &str,
    kind: &str,
    success: bool,
    detail: serde_json::Value,
) -> Result<()> {
    check_kind(kind)?;
    crate::catalog::check_instance_name(instance)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let rec = Record {
        format: FORMAT,
        kind: kind.to_string(),
        instance: instance.to_string(),
        success,
        time: now,
        time_utc: crate::backup::meta::format_utc(now),
        detail,
    };
    let mut json = serde_json::to_vec_pretty(&rec)?;
    json.push(b'\n');
    let dir = verify_key(instance);
    let repo = catalog.repo();
    let st = stamp(now);
    // Several runs in one second get -1, -2, ...: a record is never replaced.
    for n in 0..1000u32 {
        let name = if n == 0 {
            format!("{kind}-{st}.json")
        } else {
            format!("{kind}-{st}-{n}.json")
        };
        match repo.put_new(&format!("{dir}/{name}"), &json) {
            Err(e) if e.kind() == ErrorKind::Conflict => continue,
            other => return other,
        }
    }
    Err(Error::conflict(format!(
        "{}/{dir}: 1000 {kind} records in one second",
        repo.location()
    )))
}

/// Records the outcome of `walnut validate` (the problems it found, none when it passed).
/// A record that cannot be written is logged, and the validate result stands.
pub fn record_validate(
    catalog: &Catalog,
    instance: &str,
    backup_id: Option<&str>,
    success: bool,
    problems: &[String],
) {
    let detail = serde_json::json!({
        "backup_id": backup_id,
        "problems": problems,
    });
    if let Err(e) = record(catalog, instance, "validate", success, detail) {
        log::warn!("could not record this validation for monitoring: {e}");
    }
}

/// The newest record of `kind` for `instance`, if any. A newest file that cannot be read
/// or parsed is an error (corruption), not "no record".
pub fn latest(catalog: &Catalog, instance: &str, kind: &str) -> Result<Option<Record>> {
    check_kind(kind)?;
    crate::catalog::check_instance_name(instance)?;
    let dir = verify_key(instance);
    let repo = catalog.repo();
    let mut best: Option<((String, u32), String)> = None;
    for o in repo.list(&dir)?.objects {
        if let Some(key) = parse_name(&o.name, kind) {
            if best.as_ref().is_none_or(|(k, _)| key > *k) {
                best = Some((key, o.name));
            }
        }
    }
    let Some((_, name)) = best else {
        return Ok(None);
    };
    let key = format!("{dir}/{name}");
    let path = std::path::PathBuf::from(format!("{}/{key}", repo.location()));
    if repo.head(&key)?.is_some_and(|h| h.size > MAX_RECORD) {
        return Err(Error::corruption(format!(
            "{}: larger than {MAX_RECORD} bytes",
            path.display()
        )));
    }
    let bytes = repo.get(&key)?;
    let rec: Record = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corruption(format!("{}: {e}", path.display())))?;
    if rec.kind != kind || rec.instance != instance {
        return Err(Error::corruption(format!(
            "{}: record of {} \"{}\" in the wrong place",
            path.display(),
            rec.kind,
            rec.instance
        )));
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_new_files_and_the_newest_wins() {
        let repo = crate::repo::MemRepo::new().refusing_delete();
        let cat = Catalog::with_repo(std::path::Path::new("/mem"), std::sync::Arc::new(repo));
        assert_eq!(latest(&cat, "db", "validate").unwrap(), None);
        record(&cat, "db", "validate", true, serde_json::json!({"n": 1})).unwrap();
        record(&cat, "db", "validate", false, serde_json::json!({"n": 2})).unwrap();
        let files = cat.repo().list("instances/db/verify").unwrap().objects;
        assert_eq!(files.len(), 2, "one file per record");
        let r = latest(&cat, "db", "validate").unwrap().unwrap();
        assert!(!r.success);
        assert_eq!(r.detail["n"], 2);
        assert_eq!(latest(&cat, "db", "verify-restore").unwrap(), None);
        assert!(record(&cat, "db", "../x", true, serde_json::Value::Null).is_err());
    }

    #[test]
    fn names_order_by_time_then_counter() {
        let a = parse_name("validate-20261129T101010Z.json", "validate").unwrap();
        let b = parse_name("validate-20261129T101010Z-1.json", "validate").unwrap();
        let c = parse_name("validate-20261129T101011Z.json", "validate").unwrap();
        assert!(a < b && b < c);
        assert_eq!(parse_name("validate-2026.json", "validate"), None);
        assert_eq!(
            parse_name("verify-restore-20261129T101010Z.json", "validate"),
            None
        );
        assert_eq!(stamp(0), "19700101T000000Z");
    }

    #[test]
    fn an_unreadable_newest_record_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalog::init(&d.path().join("cat")).unwrap();
        cat.repo()
            .put_new("instances/db/verify/validate-20261129T101010Z.json", b"{")
            .unwrap();
        let e = latest(&cat, "db", "validate").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corruption);
    }
}
