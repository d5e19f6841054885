//! The plan phase of a restore: reads and checks everything before the first write.
//!
//! Options (the recovery target included), the backup chain, every manifest of the chain
//! (each path a normalised relative path), the tablespace map (covered by the manifest),
//! `backup_label` and every destination directory (see dirs.rs). Any error here leaves the
//! filesystem exactly as it was.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::archive::{HistoryEntry, WalArchive};
use crate::catalog::Catalog;
use crate::error::{Error, IoContext, Result};
use crate::safepath;
use crate::types::{Lsn, TimeLineId};

use super::dirs::{self, Dest, DirState, Registered};
use super::{
    choose_backup_on, quote_conf, Recovery, RecoveryTarget, RestoreOptions, TimelineTarget,
};
use crate::backup::meta::BackupMeta;
use crate::backup::stored;
use crate::format::manifest::{self, FileEntry, Storage};
use crate::repo::Repo;

/// The manifest path under which a backup's `tablespace_map` is recorded (stored as
/// `database/tablespace_map`, with its CRC like every other file). PostgreSQL never has a
/// file of that name in a data directory that a backup copies, so it cannot clash.
pub const SPCMAP_ENTRY: &str = "tablespace_map";

/// One tablespace of the backup and where it goes.
#[derive(Clone, Debug)]
pub struct Tablespace {
    pub oid: String,
    pub dest: PathBuf,
    /// Its contents are deleted first (`-T` naming it and `--force`).
    pub clear: bool,
}

/// Everything the execute phase needs; nothing has been written when it exists.
pub struct Plan<'a> {
    pub chain: Vec<&'a BackupMeta>,
    /// The newest backup's manifest, without the tablespace_map entry.
    pub entries: Vec<FileEntry>,
    /// Files of the older backups of the chain (index 1..), by path.
    pub older: Vec<HashMap<String, FileEntry>>,
    pub target: PathBuf,
    pub clear_target: bool,
    pub tablespaces: Vec<Tablespace>,
    pub backup_label: Vec<u8>,
    /// Recovery settings for postgresql.auto.conf, restore_command excluded.
    pub settings: Vec<(&'static str, String)>,
    /// Databases not restored (partial restore): their files become sparse zero files.
    pub excluded_dbs: std::collections::BTreeSet<u32>,
}

impl Plan<'_> {
    /// The `tablespace_map` the restored cluster gets: each tablespace at its destination.
    pub fn tablespace_map(&self) -> String {
        let mut s = String::new();
        for t in &self.tablespaces {
            let esc = t
                .dest
                .display()
                .to_string()
                .replace('\\', "\\\\")
                .replace('\n', "\\\n")
                .replace('\r', "\\\r");
            s.push_str(&format!("{} {esc}\n", t.oid));
        }
        s
    }
}

/// A recovery target, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    None,
    Immediate,
    Time(i64),
    Xid(u64),
    Lsn(Lsn),
    Name(String),
}

/// The target and the settings to write for `rec` (without the timeline, which depends on
/// the backup chosen). The caller parsed and checked the options; what a setting line
/// could not hold is refused here again.
pub fn check_recovery(rec: &Recovery) -> Result<(Target, Vec<(&'static str, String)>)> {
    let mut settings: Vec<(&'static str, String)> = Vec::new();
    let mut inclusive = None;
    let target = match &rec.target {
        RecoveryTarget::Latest => Target::None,
        RecoveryTarget::Immediate => {
            settings.push(("recovery_target", quote_conf("immediate")));
            Target::Immediate
        }
        RecoveryTarget::Time {
            text,
            epoch,
            inclusive: i,
        } => {
            if text.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "recovery target time {text:?} contains a control character"
                )));
            }
            settings.push(("recovery_target_time", quote_conf(text.trim())));
            inclusive = *i;
            Target::Time(*epoch)
        }
        RecoveryTarget::Xid { xid, inclusive: i } => {
            settings.push(("recovery_target_xid", quote_conf(&xid.to_string())));
            inclusive = *i;
            Target::Xid(*xid)
        }
        RecoveryTarget::Lsn { lsn, inclusive: i } => {
            settings.push(("recovery_target_lsn", quote_conf(&lsn.to_string())));
            inclusive = *i;
            Target::Lsn(*lsn)
        }
        RecoveryTarget::Name(n) => {
            // PostgreSQL's limit: MAXFNAMELEN (64) including the terminating NUL.
            if n.is_empty() || n.len() >= 64 || n.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "invalid recovery target name {n:?}: 1 to 63 bytes, no control characters"
                )));
            }
            settings.push(("recovery_target_name", quote_conf(n)));
            Target::Name(n.clone())
        }
    };
    if let Some(i) = inclusive {
        settings.push((
            "recovery_target_inclusive",
            quote_conf(if i { "on" } else { "off" }),
        ));
    }
    if let Some(TimelineTarget::Id(0)) = rec.timeline {
        return Err(Error::invalid("recovery target timeline 0 does not exist"));
    }
    if let Some(a) = rec.action {
        settings.push(("recovery_target_action", quote_conf(a.as_str())));
    }
    Ok((target, settings))
}

/// Parses `tablespace_map` lines "<oid> <path>" (14+: `\` escapes). Each oid must be a
/// number and each path absolute and normalised: the map comes from the catalog.
pub fn parse_tablespace_map(s: &str, what: &str) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = Vec::new();
    for line in s.lines() {
        if line.is_empty() {
            continue;
        }
        let bad = |why: &str| Error::corruption(format!("{what}: line {line:?}: {why}"));
        let (oid, path) = line
            .split_once(' ')
            .ok_or_else(|| bad("not \"OID PATH\""))?;
        if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) || oid.len() > 10 {
            return Err(bad("the tablespace oid is not a number"));
        }
        let mut out = String::new();
        let mut esc = false;
        for c in path.chars() {
            if esc {
                out.push(c);
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else {
                out.push(c);
            }
        }
        check_abs_path(Path::new(&out)).map_err(|why| bad(&why))?;
        if v.iter().any(|(o, _)| o == oid) {
            return Err(bad("the tablespace oid appears twice"));
        }
        v.push((oid.to_string(), out));
    }
    Ok(v)
}

/// An absolute path without `.` or `..` components.
fn check_abs_path(p: &Path) -> std::result::Result<(), String> {
    if !p.is_absolute() {
        return Err(format!("\"{}\" is not an absolute path", p.display()));
    }
    if p.components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("\"{}\" contains '.' or '..'", p.display()));
    }
    Ok(())
}

/// Checks the `-T OLD=NEW` pairs: both absolute, each OLD once.
fn check_mappings(mappings: &[(PathBuf, PathBuf)]) -> Result<()> {
    for (i, (old, new)) in mappings.iter().enumerate() {
        for p in [old, new] {
            check_abs_path(p).map_err(|why| {
                Error::invalid(format!(
                    "tablespace mapping \"{}={}\": {why}",
                    old.display(),
                    new.display()
                ))
            })?;
        }
        if mappings[..i].iter().any(|(o, _)| o == old) {
            return Err(Error::invalid(format!(
                "tablespace \"{}\" is mapped twice",
                old.display()
            )));
        }
    }
    Ok(())
}

/// Reads a stored file whole, checking its size and CRC against its manifest entry.
fn read_checked(repo: &dyn Repo, bkey: &str, e: &FileEntry) -> Result<Vec<u8>> {
    let key = format!("{bkey}/{}", e.stored_path());
    let w = stored::what(repo, &key);
    if e.storage != Storage::Full {
        return Err(Error::corruption(format!(
            "{w}: the manifest entry \"{}\" is not a plain file",
            e.path
        )));
    }
    let b = repo.get(&key)?.into_vec();
    if b.len() as u64 != e.stored_size || crc32c::crc32c(&b) != e.crc32c {
        return Err(Error::corruption(format!(
            "\"{w}\" does not match its manifest size and checksum"
        )));
    }
    Ok(b)
}

/// Reads an object of the backup that the manifest does not cover; `None` only when it
/// does not exist.
fn read_optional(repo: &dyn Repo, bkey: &str, name: &str) -> Result<Option<Vec<u8>>> {
    match repo.get(&format!("{bkey}/{name}")) {
        Ok(b) => Ok(Some(b.into_vec())),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a backup's manifest, checking every path.
pub(crate) fn read_manifest(catalog: &Catalog, b: &BackupMeta) -> Result<Vec<FileEntry>> {
    let repo = catalog.repo();
    let key = b.key()?;
    let entries = stored::manifest_entries(repo, &key)?;
    let what = format!(
        "manifest of backup {} ({})",
        b.id,
        stored::what(repo, &format!("{key}/{}", manifest::FILE_NAME))
    );
    for e in &entries {
        safepath::check_rel_path(&e.path, &what)?;
    }
    Ok(entries)
}

/// The restore point the target names, when the block indexes know it: its timeline, LSN
/// and the history of its timeline.
pub struct PointInfo {
    pub tli: TimeLineId,
    pub lsn: Lsn,
    pub history: Vec<HistoryEntry>,
}

fn find_point(catalog: &Catalog, instance: &str, name: &str) -> Option<PointInfo> {
    let found = WalArchive::open(catalog, instance).and_then(|a| {
        Ok(match a.find_restore_point(name)? {
            Some((tli, lsn)) => Some((tli, lsn, a.timeline_history(tli)?)),
            None => None,
        })
    });
    match found {
        Ok(Some((tli, lsn, history))) => {
            log::info!("restore point \"{name}\" is at {lsn} on timeline {tli}");
            Some(PointInfo { tli, lsn, history })
        }
        Ok(None) => {
            log::warn!("restore point \"{name}\" is not in the block indexes");
            None
        }
        Err(e) => {
            log::warn!("could not look up restore point \"{name}\": {e}");
            None
        }
    }
}

/// Whether backup `b` can reach a point on timeline `tli` whose history is `history`: it is
/// on that timeline, or on an ancestor that the history left after the backup ended.
pub fn on_history(b: &BackupMeta, tli: TimeLineId, history: &[HistoryEntry]) -> bool {
    b.timeline == tli
        || history
            .iter()
            .any(|h| h.tli == b.timeline && b.stop_lsn.is_some_and(|s| s <= h.switchpoint))
}

/// The recovery_target_timeline to write. A timeline the operator gave wins. A named point
/// known to the indexes: its timeline. A time, xid or LSN: the restored backup's own
/// timeline (pg_probackup's `current`), since PostgreSQL's default, the newest timeline,
/// may have left it before the target. No target: PostgreSQL's default.
fn timeline_setting(
    rt: &Recovery,
    target: &Target,
    point: Option<&PointInfo>,
    newest: &BackupMeta,
) -> Option<String> {
    if let Some(t) = &rt.timeline {
        return Some(t.to_string());
    }
    match target {
        Target::Name(_) => point.map(|p| p.tli.to_string()),
        Target::Time(_) | Target::Xid(_) | Target::Lsn(_) => Some(newest.timeline.to_string()),
        Target::None | Target::Immediate => None,
    }
}

/// The plan phase (see the module docs).
pub fn plan<'a>(
    catalog: &Catalog,
    instance: &str,
    list: &'a [BackupMeta],
    opts: &RestoreOptions,
) -> Result<Plan<'a>> {
    let cfg = catalog.instance(instance)?;
    let (target_kind, mut settings) = check_recovery(&opts.recovery)?;
    check_mappings(&opts.mappings)?;
    let target = std::path::absolute(&opts.target).ctx("resolve", &opts.target)?;

    // the chain
    let point = match &target_kind {
        Target::Name(n) => find_point(catalog, instance, n),
        _ => None,
    };
    let chain = choose_backup_on(list, opts.backup_id.as_deref(), &target_kind, |b| {
        point.as_ref().is_none_or(|p| {
            b.stop_lsn.is_some_and(|s| s <= p.lsn) && on_history(b, p.tli, &p.history)
        })
    })?;
    let newest = chain[0];
    if let Some(tl) = timeline_setting(&opts.recovery, &target_kind, point.as_ref(), newest) {
        settings.push(("recovery_target_timeline", quote_conf(&tl)));
    }

    // every manifest of the chain
    let repo = catalog.repo();
    let bkey = newest.key()?;
    let mut entries = read_manifest(catalog, newest)?;
    let mut older = Vec::new();
    for b in chain.iter().skip(1) {
        let mut m = HashMap::new();
        for e in read_manifest(catalog, b)? {
            if e.storage != Storage::Dir {
                m.insert(e.path.clone(), e);
            }
        }
        older.push(m);
    }
    if !entries.iter().any(|e| e.path == "global/pg_control") {
        return Err(Error::corruption(format!(
            "backup {} has no global/pg_control",
            newest.id
        )));
    }

    // the tablespace map: a manifest entry (checked against its CRC); backups from before
    // that keep it beside the manifest, where only its absence means "no tablespaces"
    let spcmap = match entries.iter().position(|e| e.path == SPCMAP_ENTRY) {
        Some(i) => Some(read_checked(repo, &bkey, &entries.remove(i))?),
        None => read_optional(repo, &bkey, "tablespace_map")?,
    };
    let spc_what = format!("tablespace_map of backup {}", newest.id);
    let spcmap = match spcmap {
        Some(b) => String::from_utf8(b)
            .map_err(|_| Error::corruption(format!("{spc_what}: not UTF-8 text")))?,
        None => String::new(),
    };
    let map = parse_tablespace_map(&spcmap, &spc_what)?;
    for (old, _) in &opts.mappings {
        if !map.iter().any(|(_, p)| Path::new(p) == old) {
            let known: Vec<&str> = map.iter().map(|(_, p)| p.as_str()).collect();
            return Err(Error::invalid(format!(
                "-T \"{}\" matches no tablespace of backup {} (its tablespaces: {})",
                old.display(),
                newest.id,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )));
        }
    }
    let backup_label = read_optional(repo, &bkey, "backup_label")?.ok_or_else(|| {
        Error::corruption(format!(
            "backup {} has no backup_label ({})",
            newest.id,
            stored::what(repo, &format!("{bkey}/backup_label"))
        ))
    })?;

    // the destinations
    // The catalog's own directory, when it is one: a restore never writes into it.
    let cat = repo.local_root().map(dirs::resolve).transpose()?;
    let reg = Registered::probe(&cfg.pgdata)?;
    let st = dirs::check(
        &Dest {
            what: "target directory".into(),
            path: &target,
            may_clear: opts.force,
            not_empty_hint: "restore into an empty or new directory, or add --force if everything in it is to be deleted".into(),
        },
        cat.as_deref(),
        instance,
        &reg,
    )?;
    let clear_target = st == DirState::NonEmpty;
    let mut resolved = vec![(dirs::resolve(&target)?, "the target directory".to_string())];
    let mut tablespaces = Vec::new();
    for (oid, path) in map {
        let mapped = opts
            .mappings
            .iter()
            .find(|(old, _)| Path::new(&path) == old)
            .map(|(_, new)| new.clone());
        let dest = mapped.clone().unwrap_or_else(|| PathBuf::from(&path));
        let what = format!("tablespace {oid} location");
        let hint = if mapped.is_some() {
            "give an empty or new directory, or add --force if everything in it is to be deleted"
                .to_string()
        } else {
            format!("it comes from the backup's tablespace_map; restore the tablespace elsewhere with -T \"{path}=NEW_DIR\" (--force alone never clears a tablespace location)")
        };
        let st = dirs::check(
            &Dest {
                what: what.clone(),
                path: &dest,
                may_clear: opts.force && mapped.is_some(),
                not_empty_hint: hint,
            },
            cat.as_deref(),
            instance,
            &reg,
        )?;
        let r = dirs::resolve(&dest)?;
        if let Some((_, other)) = resolved.iter().find(|(o, _)| dirs::overlaps(o, &r)) {
            return Err(Error::invalid(format!(
                "refusing to restore into {what} \"{}\": it overlaps {other}",
                dest.display()
            )));
        }
        resolved.push((r, format!("{what} \"{}\"", dest.display())));
        tablespaces.push(Tablespace {
            oid,
            dest,
            clear: st == DirState::NonEmpty,
        });
    }
    Ok(Plan {
        chain,
        entries,
        older,
        target,
        clear_target,
        tablespaces,
        backup_label,
        settings,
        excluded_dbs: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_follow_the_target() {
        let set = |t: RecoveryTarget| {
            check_recovery(&Recovery {
                target: t,
                timeline: Some(TimelineTarget::Latest),
                action: Some(super::super::RecoveryAction::Promote),
            })
            .unwrap()
        };
        let (t, s) = set(RecoveryTarget::Xid {
            xid: 1234,
            inclusive: Some(false),
        });
        assert_eq!(t, Target::Xid(1234));
        assert_eq!(
            s,
            vec![
                ("recovery_target_xid", "'1234'".to_string()),
                ("recovery_target_inclusive", "'off'".to_string()),
                ("recovery_target_action", "'promote'".to_string()),
            ]
        );
        assert_eq!(set(RecoveryTarget::Latest).0, Target::None);
        for bad in [
            RecoveryTarget::Name(String::new()),
            RecoveryTarget::Name("x".repeat(64)),
            RecoveryTarget::Name("a\nrestore_command='x'".into()),
        ] {
            assert!(
                check_recovery(&Recovery {
                    target: bad.clone(),
                    ..Recovery::default()
                })
                .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tablespace_maps_are_checked() {
        let v = parse_tablespace_map("16400 /srv/ts one\n16401 /a\\\\b\n", "m").unwrap();
        assert_eq!(
            v,
            vec![
                ("16400".into(), "/srv/ts one".into()),
                ("16401".into(), "/a\\b".into())
            ]
        );
        for bad in [
            "16400 relative/ts\n",
            "16400 /a/../b\n",
            "x /a\n",
            "16400\n",
            "1 /a\n1 /b\n",
        ] {
            assert!(parse_tablespace_map(bad, "m").is_err(), "{bad:?}");
        }
        assert!(check_mappings(&[("/a".into(), "rel".into())]).is_err());
        assert!(check_mappings(&[("/a".into(), "/b".into()), ("/a".into(), "/c".into())]).is_err());
    }
}
