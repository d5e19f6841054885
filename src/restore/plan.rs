//! The plan phase of a restore: reads and checks everything before the first write.
//!
//! Options (the recovery target included), the backup chain, every manifest of the chain
//! (each path a normalised relative path), the tablespace map (covered by the manifest),
//! `backup_label` and every destination directory (see dirs.rs). Any error here leaves the
//! filesystem exactly as it was.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::archive::{HistoryEntry, WalArchive};
use crate::catalog::Catalog;
use crate::error::{Error, IoContext, Result};
use crate::safepath;
use crate::types::{Lsn, TimeLineId};

use super::dirs::{self, Dest, DirState, Registered};
use super::{choose_backup_on, quote_conf, RecoveryTarget, RestoreOptions};
use crate::backup::meta::{self, BackupMeta};
use crate::format::manifest::{self, FileEntry, Storage};

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

/// Parses and checks every recovery option; returns the target and the settings to write
/// (without the timeline, which depends on the backup chosen).
pub fn check_recovery(rt: &RecoveryTarget) -> Result<(Target, Vec<(&'static str, String)>)> {
    let given = [
        ("--recovery-target-time", &rt.time),
        ("--recovery-target-xid", &rt.xid),
        ("--recovery-target-lsn", &rt.lsn),
        ("--recovery-target-name", &rt.name),
        ("--recovery-target", &rt.target),
    ];
    let set: Vec<&str> = given
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
    if set.len() > 1 {
        return Err(Error::invalid(format!(
            "give at most one recovery target ({} were given)",
            set.join(", ")
        )));
    }
    for (k, v) in given.iter().chain(
        [
            ("--recovery-target-timeline", &rt.timeline),
            ("--recovery-target-action", &rt.action),
        ]
        .iter(),
    ) {
        if let Some(v) = v {
            if v.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "{k} {v:?} contains a control character"
                )));
            }
        }
    }
    let mut settings: Vec<(&'static str, String)> = Vec::new();
    let target = if let Some(t) = &rt.time {
        let secs = meta::parse_time(t)?;
        settings.push(("recovery_target_time", quote_conf(t.trim())));
        Target::Time(secs)
    } else if let Some(x) = &rt.xid {
        let xid: u64 = x.trim().parse().map_err(|_| {
            Error::invalid(format!(
                "invalid --recovery-target-xid '{x}': expected a transaction id (a number)"
            ))
        })?;
        settings.push(("recovery_target_xid", quote_conf(&xid.to_string())));
        Target::Xid(xid)
    } else if let Some(l) = &rt.lsn {
        let lsn: Lsn = l.parse()?;
        settings.push(("recovery_target_lsn", quote_conf(&lsn.to_string())));
        Target::Lsn(lsn)
    } else if let Some(n) = &rt.name {
        // PostgreSQL's limit: MAXFNAMELEN (64) including the terminating NUL.
        if n.is_empty() || n.len() >= 64 {
            return Err(Error::invalid(format!(
                "invalid --recovery-target-name {n:?}: 1 to 63 bytes"
            )));
        }
        settings.push(("recovery_target_name", quote_conf(n)));
        Target::Name(n.clone())
    } else {
        match rt.target.as_deref() {
            None | Some("latest") => Target::None,
            Some("immediate") => {
                settings.push(("recovery_target", quote_conf("immediate")));
                Target::Immediate
            }
            Some(o) => {
                return Err(Error::invalid(format!(
                    "invalid --recovery-target '{o}': immediate or latest"
                )))
            }
        }
    };
    if let Some(i) = rt.inclusive {
        settings.push((
            "recovery_target_inclusive",
            quote_conf(if i { "on" } else { "off" }),
        ));
    }
    if let Some(t) = &rt.timeline {
        check_timeline(t)?;
    }
    if let Some(a) = &rt.action {
        if !["pause", "promote", "shutdown"].contains(&a.as_str()) {
            return Err(Error::invalid(format!(
                "invalid --recovery-target-action '{a}': pause, promote or shutdown"
            )));
        }
        settings.push(("recovery_target_action", quote_conf(a)));
    }
    Ok((target, settings))
}

fn check_timeline(t: &str) -> Result<()> {
    if t == "current" || t == "latest" || t.parse::<TimeLineId>().is_ok_and(|n| n >= 1) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid --recovery-target-timeline '{t}': a timeline number, current or latest"
        )))
    }
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
fn read_checked(bdir: &Path, e: &FileEntry) -> Result<Vec<u8>> {
    let rel = e.stored_path();
    let p = bdir.join(&rel);
    if e.storage != Storage::Full {
        return Err(Error::corruption(format!(
            "{}: the manifest entry \"{}\" is not a plain file",
            p.display(),
            e.path
        )));
    }
    let mut f = safepath::open_under(bdir, &rel)?;
    let mut b = Vec::new();
    f.read_to_end(&mut b).ctx("read", &p)?;
    if b.len() as u64 != e.stored_size || crc32c::crc32c(&b) != e.crc32c {
        return Err(Error::corruption(format!(
            "\"{}\" does not match its manifest size and checksum",
            p.display()
        )));
    }
    Ok(b)
}

/// Reads a file of the backup directory that the manifest does not cover; `None` only when
/// it does not exist.
fn read_optional(bdir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    match safepath::open_under(bdir, name) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b).ctx("read", &bdir.join(name))?;
            Ok(Some(b))
        }
        Err(e) if e.kind() == crate::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a backup's manifest, checking every path.
fn read_manifest(catalog: &Catalog, b: &BackupMeta) -> Result<Vec<FileEntry>> {
    let p = b.dir(catalog).join("manifest");
    let entries = manifest::read_file(&p)?;
    let what = format!("manifest of backup {} ({})", b.id, p.display());
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
    rt: &RecoveryTarget,
    target: &Target,
    point: Option<&PointInfo>,
    newest: &BackupMeta,
) -> Option<String> {
    if let Some(t) = &rt.timeline {
        return Some(t.clone());
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
    let bdir = newest.dir(catalog);
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
        Some(i) => Some(read_checked(&bdir, &entries.remove(i))?),
        None => read_optional(&bdir, "tablespace_map")?,
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
    let backup_label = read_optional(&bdir, "backup_label")?.ok_or_else(|| {
        Error::corruption(format!(
            "backup {} has no backup_label ({})",
            newest.id,
            bdir.join("backup_label").display()
        ))
    })?;

    // the destinations
    let cat = dirs::resolve(catalog.root())?;
    let reg = Registered::probe(&cfg.pgdata)?;
    let st = dirs::check(
        &Dest {
            what: "target directory".into(),
            path: &target,
            may_clear: opts.force,
            not_empty_hint: "restore into an empty or new directory, or add --force if everything in it is to be deleted".into(),
        },
        &cat,
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
            &cat,
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> RecoveryTarget {
        RecoveryTarget::default()
    }

    #[test]
    fn targets_are_parsed() {
        let ok = |r: RecoveryTarget| check_recovery(&r).unwrap().0;
        assert_eq!(
            ok(RecoveryTarget {
                xid: Some(" 1234 ".into()),
                ..rt()
            }),
            Target::Xid(1234)
        );
        assert_eq!(
            ok(RecoveryTarget {
                lsn: Some("0/16B3748".into()),
                ..rt()
            }),
            Target::Lsn(Lsn(0x16B3748))
        );
        assert_eq!(ok(rt()), Target::None);
        let bad = [
            RecoveryTarget {
                time: Some("yesterday".into()),
                ..rt()
            },
            RecoveryTarget {
                xid: Some("12a".into()),
                ..rt()
            },
            RecoveryTarget {
                lsn: Some("16B3748".into()),
                ..rt()
            },
            RecoveryTarget {
                name: Some(String::new()),
                ..rt()
            },
            RecoveryTarget {
                name: Some("x".repeat(64)),
                ..rt()
            },
            RecoveryTarget {
                name: Some("a\nrestore_command='x'".into()),
                ..rt()
            },
            RecoveryTarget {
                timeline: Some("0".into()),
                ..rt()
            },
            RecoveryTarget {
                timeline: Some("newest".into()),
                ..rt()
            },
            RecoveryTarget {
                action: Some("explode".into()),
                ..rt()
            },
            RecoveryTarget {
                target: Some("now".into()),
                ..rt()
            },
            RecoveryTarget {
                xid: Some("5".into()),
                name: Some("p".into()),
                ..rt()
            },
        ];
        for r in bad {
            assert!(check_recovery(&r).is_err(), "{r:?}");
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
