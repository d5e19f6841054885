//! Partial restore: `--db-include` / `--db-exclude` by database name.
//!
//! A backup records its databases' names and OIDs at backup time (`databases.json`,
//! written by the backup beside its manifest). The system databases `template0`,
//! `template1` and `postgres` are always restored, recognised by name, so a `postgres`
//! recreated under a new OID is still one. Files of excluded databases become sparse zeroed
//! files of their original length: PostgreSQL recovers them (WAL for them replays onto
//! zero pages), and the database must be dropped after recovery.
//!
//! ```text
//! databases.json (UTF-8 JSON): {"format": 1, "databases": [{"oid": N, "name": "..."}, ...]}
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::backup::meta::BackupMeta;
use crate::backup::relfile;
use crate::catalog::Catalog;
use crate::error::{Error, Result};

pub const DATABASES_FILE: &str = "databases.json";
const FORMAT: u32 = 1;
/// Always restored, by name.
pub const SYSTEM_DATABASES: [&str; 3] = ["template0", "template1", "postgres"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub oid: u32,
    pub name: String,
}

#[derive(Serialize, Deserialize)]
struct DatabasesFile {
    format: u32,
    databases: Vec<Database>,
}

/// The bytes of `databases.json` for `dbs`.
pub fn encode(dbs: &[Database]) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec_pretty(&DatabasesFile {
        format: FORMAT,
        databases: dbs.to_vec(),
    })?)
}

/// Parses `databases.json`; `what` names it. Untrusted: every OID non-zero and once, every
/// name once, 1 to 63 bytes without control characters (names are data, never paths: a
/// name like `../x` selects nothing but the OID it stands beside).
pub fn decode(b: &[u8], what: &str) -> Result<Vec<Database>> {
    let f: DatabasesFile =
        serde_json::from_slice(b).map_err(|e| Error::corruption(format!("{what}: {e}")))?;
    if f.format != FORMAT {
        return Err(Error::corruption(format!(
            "{what}: unknown format {} (this walnut reads {FORMAT})",
            f.format
        )));
    }
    let (mut oids, mut names) = (BTreeSet::new(), BTreeSet::new());
    for d in &f.databases {
        if d.oid == 0
            || d.name.is_empty()
            || d.name.len() > 63
            || d.name.chars().any(char::is_control)
            || !oids.insert(d.oid)
            || !names.insert(d.name.clone())
        {
            return Err(Error::corruption(format!(
                "{what}: invalid or repeated database {:?} (oid {})",
                d.name, d.oid
            )));
        }
    }
    Ok(f.databases)
}

/// How messages name backup `b`'s `databases.json`: its place in the catalog.
pub fn file_name(catalog: &Catalog, b: &BackupMeta) -> Result<String> {
    Ok(format!(
        "{}/{}/{DATABASES_FILE}",
        catalog.repo().location(),
        b.key()?
    ))
}

/// The databases of backup `b`; `None` for a backup taken before walnut recorded them.
pub fn read(catalog: &Catalog, b: &BackupMeta) -> Result<Option<Vec<Database>>> {
    let key = format!("{}/{DATABASES_FILE}", b.key()?);
    match catalog.repo().get(&key) {
        Ok(blob) => Ok(Some(decode(&blob.into_vec(), &file_name(catalog, b)?)?)),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The OIDs of the databases not to restore, for `include` / `exclude` (one of them
/// empty); names are checked against the backup before anything is written.
pub fn excluded_oids(
    dbs: Option<&[Database]>,
    backup: &str,
    include: &[String],
    exclude: &[String],
) -> Result<BTreeSet<u32>> {
    if include.is_empty() && exclude.is_empty() {
        return Ok(BTreeSet::new());
    }
    if !include.is_empty() && !exclude.is_empty() {
        return Err(Error::invalid(
            "--db-include and --db-exclude cannot be combined",
        ));
    }
    let dbs = dbs.ok_or_else(|| {
        Error::invalid(format!(
            "backup {backup} has no database map (taken by an older walnut); partial restore needs a newer backup"
        ))
    })?;
    for n in include.iter().chain(exclude) {
        if !dbs.iter().any(|d| &d.name == n) {
            let known: Vec<String> = dbs.iter().map(|d| format!("{:?}", d.name)).collect();
            return Err(Error::invalid(format!(
                "database {n:?} is not in backup {backup} (its databases: {})",
                known.join(", ")
            )));
        }
    }
    if let Some(n) = exclude
        .iter()
        .find(|n| SYSTEM_DATABASES.contains(&n.as_str()))
    {
        return Err(Error::invalid(format!(
            "database \"{n}\" cannot be excluded: template0, template1 and postgres are always restored"
        )));
    }
    Ok(dbs
        .iter()
        .filter(|d| !SYSTEM_DATABASES.contains(&d.name.as_str()))
        .filter(|d| {
            if include.is_empty() {
                exclude.contains(&d.name)
            } else {
                !include.contains(&d.name)
            }
        })
        .map(|d| d.oid)
        .collect())
}

/// `FirstNormalObjectId`: every database a user creates has an OID at least this.
const FIRST_NORMAL_OID: u32 = 16384;

/// Checks the excluded OIDs (from the untrusted map `what`) against the backup's manifest
/// `entries` before anything is written: each must be a user database's OID (a lower one is
/// a system database's directory) whose directory `base/<oid>` the backup holds.
pub fn check_excluded(
    excluded: &BTreeSet<u32>,
    dbs: &[Database],
    entries: &[crate::format::manifest::FileEntry],
    what: &str,
) -> Result<()> {
    for &oid in excluded {
        let name = dbs
            .iter()
            .find(|d| d.oid == oid)
            .map_or(String::new(), |d| d.name.clone());
        if oid < FIRST_NORMAL_OID {
            return Err(Error::corruption(format!(
                "{what}: database {name:?} has oid {oid}, below {FIRST_NORMAL_OID}: a system database's, no user database's; refusing to exclude it"
            )));
        }
        let has_dir = entries.iter().any(|e| {
            let dir = match e.storage {
                crate::format::manifest::Storage::Dir => Some(e.path.as_str()),
                _ => e.path.rsplit_once('/').map(|(d, _)| d),
            };
            matches!(dir.and_then(relfile::db_dir), Some((_, db)) if db == oid)
        });
        if !has_dir {
            return Err(Error::corruption(format!(
                "{what}: database {name:?} has oid {oid}, but the backup has no directory of a database {oid}"
            )));
        }
    }
    Ok(())
}

/// Whether the logical path is a file of one of the `excluded` databases.
pub fn is_excluded(path: &str, excluded: &BTreeSet<u32>) -> bool {
    if excluded.is_empty() {
        return false;
    }
    let Some((dir, _)) = path.rsplit_once('/') else {
        return false;
    };
    matches!(relfile::db_dir(dir), Some((_, db)) if db != 0 && excluded.contains(&db))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dbs() -> Vec<Database> {
        [
            (1, "template1"),
            (4, "template0"),
            (16500, "postgres"),
            (16384, "a"),
            (16385, "b"),
        ]
        .iter()
        .map(|&(oid, n)| Database {
            oid,
            name: n.into(),
        })
        .collect()
    }

    #[test]
    fn include_and_exclude_by_name() {
        let d = dbs();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let ex = excluded_oids(Some(&d), "B", &s(&["a"]), &[]).unwrap();
        assert_eq!(ex.into_iter().collect::<Vec<_>>(), vec![16385]);
        let ex = excluded_oids(Some(&d), "B", &[], &s(&["a"])).unwrap();
        assert_eq!(ex.into_iter().collect::<Vec<_>>(), vec![16384]);
        assert!(excluded_oids(Some(&d), "B", &s(&["zz"]), &[]).is_err());
        assert!(excluded_oids(Some(&d), "B", &[], &s(&["postgres"])).is_err());
        assert!(excluded_oids(None, "B", &s(&["a"]), &[]).is_err());
        assert!(excluded_oids(None, "B", &[], &[]).unwrap().is_empty());
        let ex: BTreeSet<u32> = [16385].into();
        assert!(is_excluded("base/16385/1259", &ex));
        assert!(!is_excluded("base/16384/1259", &ex));
        assert!(!is_excluded("global/1262", &ex));
        assert!(is_excluded("pg_tblspc/16400/PG_15_202209061/16385/5", &ex));
    }

    /// Excluded OIDs must be user databases' (>= 16384) with a directory in the backup;
    /// names are data (a path-like one is fine), control characters are refused.
    #[test]
    fn excluded_oids_checked_against_the_manifest() {
        use crate::format::manifest::FileEntry;
        let entries = vec![
            FileEntry::dir("base/1".into()),
            FileEntry::dir("base/16384".into()),
            FileEntry::dir("pg_tblspc/16400/PG_15_202209061/16385".into()),
        ];
        let d = dbs();
        let ok = |oids: &[u32]| check_excluded(&oids.iter().copied().collect(), &d, &entries, "M");
        assert!(ok(&[]).is_ok());
        assert!(ok(&[16384, 16385]).is_ok());
        let e = ok(&[16386]).unwrap_err().to_string();
        assert!(e.starts_with("M: ") && e.contains("no directory"), "{e}");
        let e = ok(&[1]).unwrap_err().to_string();
        assert!(e.contains("below 16384"), "{e}");
        let path_like = br#"{"format": 1, "databases": [{"oid": 16384, "name": "../../x"}]}"#;
        assert_eq!(decode(path_like, "M").unwrap()[0].name, "../../x");
        let ctl = br#"{"format": 1, "databases": [{"oid": 16384, "name": "a\nb"}]}"#;
        let e = decode(ctl, "M").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn map_round_trip_and_damage() {
        let b = encode(&dbs()).unwrap();
        assert_eq!(decode(&b, "x").unwrap(), dbs());
        let mut twice = dbs();
        twice.push(Database {
            oid: 1,
            name: "c".into(),
        });
        assert!(decode(&encode(&twice).unwrap(), "x").is_err());
        assert!(decode(b"{\"format\": 9, \"databases\": []}", "x").is_err());
    }
}
