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
/// name once, 1 to 63 bytes.
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

/// The databases of backup `b`; `None` for a backup taken before walnut recorded them.
pub fn read(catalog: &Catalog, b: &BackupMeta) -> Result<Option<Vec<Database>>> {
    let key = format!("{}/{DATABASES_FILE}", b.key()?);
    match catalog.repo().get(&key) {
        Ok(blob) => Ok(Some(decode(
            &blob.into_vec(),
            &format!("{DATABASES_FILE} of backup {}", b.id),
        )?)),
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
            let known: Vec<&str> = dbs.iter().map(|d| d.name.as_str()).collect();
            return Err(Error::invalid(format!(
                "database \"{n}\" is not in backup {backup} (its databases: {})",
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
