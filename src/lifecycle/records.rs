//! Append-only lifecycle records: an instance's retention settings and a backup's pin.
//!
//! ```text
//! instances/NAME/settings/<UTC>[-n].json   Settings: the whole retention settings after a
//!                                          change (set-config); the newest one wins
//! instances/NAME/backups/ID/pin/<UTC>[-n].json
//!                                          Pin: expiry and note after a change
//!                                          (set-backup); the newest one wins
//! ```
//! `<UTC>` is `YYYYMMDDTHHMMSSZ`; several records in one second get `-1`, `-2`, ... Nothing
//! is rewritten: a change is a new record holding the complete new state.

use serde::{Deserialize, Serialize};

use crate::backup::meta::{self, backup_key};
use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::repo::Repo;

pub const SETTINGS_DIR: &str = "settings";
pub const PIN_DIR: &str = "pin";
const RECORD_FORMAT: u32 = 1;

/// Retention settings of an instance. `None`: not set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub retention_redundancy: Option<u32>,
    pub retention_window: Option<u32>,
    pub wal_depth: Option<u32>,
}

impl Settings {
    /// `self` with every setting `over` has replacing it; a given 0 unsets.
    pub fn overlay(&self, over: &Settings) -> Settings {
        let pick = |a: Option<u32>, b: Option<u32>| match b {
            Some(0) => None,
            Some(v) => Some(v),
            None => a,
        };
        Settings {
            retention_redundancy: pick(self.retention_redundancy, over.retention_redundancy),
            retention_window: pick(self.retention_window, over.retention_window),
            wal_depth: pick(self.wal_depth, over.wal_depth),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SettingsRecord {
    format: u32,
    #[serde(flatten)]
    settings: Settings,
    time: String,
}

/// A backup's pin: retention keeps it (and its ancestors) until `expire_epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub format: u32,
    /// Unix seconds; `None`: not pinned.
    pub expire_epoch: Option<i64>,
    /// The same, "YYYY-MM-DD HH:MM:SS+00".
    pub expire_time: Option<String>,
    pub note: Option<String>,
    /// When it was recorded.
    pub time: String,
}

impl Pin {
    pub fn pinned_at(&self, now: i64) -> bool {
        self.expire_epoch.is_some_and(|e| e > now)
    }
}

/// Test hook: seconds added to the clock of `backup` (its start, end and recovery times and
/// its id) and of the lifecycle commands ("now" of the window and the pins), so a test can
/// take a "month" of backups in minutes. Unset (or unparsable): 0.
pub const CLOCK_OFFSET_ENV: &str = "WALNUT_TEST_CLOCK_OFFSET";

pub fn test_clock_offset() -> i64 {
    std::env::var(CLOCK_OFFSET_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Unix seconds now (moved by [`CLOCK_OFFSET_ENV`] in tests).
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + test_clock_offset()
}

fn name_of(st: &str, n: u32) -> String {
    if n == 0 {
        format!("{st}.json")
    } else {
        format!("{st}-{n}.json")
    }
}

/// The newest record under `dir`, parsed; `None` when there is none. A newest record that
/// cannot be read is damage, never "none".
fn newest<T: serde::de::DeserializeOwned>(repo: &dyn Repo, dir: &str) -> Result<Option<T>> {
    let Some((st, n)) = repo
        .list(dir)?
        .objects
        .iter()
        .filter_map(|o| crate::backup::meta::parse_record_name(&o.name))
        .max()
    else {
        return Ok(None);
    };
    let key = format!("{dir}/{}", name_of(&st, n));
    let what = || format!("{}/{key}", repo.location());
    let b = repo.get(&key).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            Error::corruption(format!("{}: listed but absent", what()))
        } else {
            e
        }
    })?;
    serde_json::from_slice(&b)
        .map(Some)
        .map_err(|e| Error::corruption(format!("{}: {e}", what())))
}

/// Writes `data` as a new record under `dir`, sorting after every existing one.
fn put_record(repo: &dyn Repo, dir: &str, data: &[u8], now: i64) -> Result<()> {
    let st = meta::stamp(now);
    let mut n = repo
        .list(dir)?
        .objects
        .iter()
        .filter_map(|o| crate::backup::meta::parse_record_name(&o.name))
        .max()
        .filter(|(s, _)| *s == st)
        .map_or(0, |(_, k)| k + 1);
    for _ in 0..1000 {
        match repo.put_new(&format!("{dir}/{}", name_of(&st, n)), data) {
            Err(e) if e.kind() == ErrorKind::Conflict => n += 1,
            other => return other,
        }
    }
    Err(Error::conflict(format!(
        "{}/{dir}: 1000 records in one second",
        repo.location()
    )))
}

fn settings_dir(instance: &str) -> String {
    format!("{}/{SETTINGS_DIR}", Catalog::instance_key(instance))
}

/// The instance's current retention settings (all unset when never set).
pub fn load_settings(catalog: &Catalog, instance: &str) -> Result<Settings> {
    catalog.instance(instance)?;
    let r: Option<SettingsRecord> = newest(catalog.repo(), &settings_dir(instance))?;
    match r {
        Some(r) if r.format != RECORD_FORMAT => Err(Error::corruption(format!(
            "settings record format {} of instance \"{instance}\" is not supported",
            r.format
        ))),
        Some(r) => Ok(r.settings),
        None => Ok(Settings::default()),
    }
}

/// Records `change` over the current settings (a new record); returns the new settings.
pub fn set_settings(catalog: &Catalog, instance: &str, change: &Settings) -> Result<Settings> {
    let _lock = super::locks::lifecycle_shared(catalog, instance)?;
    let cur = load_settings(catalog, instance)?;
    let next = cur.overlay(change);
    let now = now_secs();
    let rec = SettingsRecord {
        format: RECORD_FORMAT,
        settings: next.clone(),
        time: meta::format_utc(now),
    };
    let mut json = serde_json::to_vec_pretty(&rec)?;
    json.push(b'\n');
    put_record(catalog.repo(), &settings_dir(instance), &json, now)?;
    Ok(next)
}

fn pin_dir(instance: &str, id: &str) -> Result<String> {
    Ok(format!("{}/{PIN_DIR}", backup_key(instance, id)?))
}

/// The backup's current pin (unpinned, no note, when never set).
pub fn load_pin(catalog: &Catalog, instance: &str, id: &str) -> Result<Pin> {
    let p: Option<Pin> = newest(catalog.repo(), &pin_dir(instance, id)?)?;
    match p {
        Some(p) if p.format != RECORD_FORMAT => Err(Error::corruption(format!(
            "pin record format {} of backup {id} is not supported",
            p.format
        ))),
        Some(p) => Ok(p),
        None => Ok(Pin::default()),
    }
}

/// What `set-backup` changes: `expire` `Some(None)` unpins, `Some(Some(t))` pins until t.
#[derive(Clone, Debug, Default)]
pub struct PinChange {
    pub expire: Option<Option<i64>>,
    pub note: Option<String>,
}

/// Records a new pin of backup `id` (which must exist); returns it.
/// Holds the instance's lifecycle lock shared: waits for a running delete or merge, which
/// then sees the pin whole or not at all.
pub fn set_pin(catalog: &Catalog, instance: &str, id: &str, change: &PinChange) -> Result<Pin> {
    let _lock = super::locks::lifecycle_shared(catalog, instance)?;
    set_pin_locked(catalog, instance, id, change)
}

/// [`set_pin`] for a caller that holds the instance's lifecycle lock already (merge moves
/// a pin while it holds the lock exclusively: taking it again, shared, would wait forever).
pub(crate) fn set_pin_locked(
    catalog: &Catalog,
    instance: &str,
    id: &str,
    change: &PinChange,
) -> Result<Pin> {
    let b = meta::load_in(catalog, instance, id)?;
    if super::being_deleted(&b) {
        return Err(Error::refused(format!(
            "backup {id} is being deleted (an interrupted delete marked it); it cannot be pinned"
        )));
    }
    let mut p = load_pin(catalog, instance, id)?;
    let now = now_secs();
    if let Some(e) = change.expire {
        p.expire_epoch = e;
        p.expire_time = e.map(meta::format_utc);
    }
    if let Some(n) = &change.note {
        p.note = (!n.is_empty()).then(|| n.clone());
    }
    p.format = RECORD_FORMAT;
    p.time = meta::format_utc(now);
    let mut json = serde_json::to_vec_pretty(&p)?;
    json.push(b'\n');
    put_record(catalog.repo(), &pin_dir(instance, id)?, &json, now)?;
    Ok(p)
}

/// `30d`, `12h`, `90m`, `45s` (or plain seconds) to seconds.
pub fn parse_duration(s: &str) -> Result<i64> {
    let bad = || {
        Error::invalid(format!(
            "cannot parse duration '{s}' (expected e.g. 30d, 12h, 90m)"
        ))
    };
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'd')) => (&s[..i], 86400),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 's')) => (&s[..i], 1),
        Some(_) => (s, 1),
        None => return Err(bad()),
    };
    let n: i64 = num.parse().map_err(|_| bad())?;
    if n < 0 {
        return Err(bad());
    }
    n.checked_mul(mul).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::MemRepo;
    use std::sync::Arc;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86400);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_duration("90m").unwrap(), 90 * 60);
        assert_eq!(parse_duration("0").unwrap(), 0);
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1d").is_err());
    }

    #[test]
    fn newest_record_wins_and_overlay_keeps_unset_values() {
        let repo = Arc::new(MemRepo::new());
        repo.put_new("w/20260101T000000Z.json", b"{\"format\":1,\"retention_redundancy\":1,\"retention_window\":null,\"wal_depth\":null,\"time\":\"\"}").unwrap();
        repo.put_new("w/20260101T000000Z-1.json", b"{\"format\":1,\"retention_redundancy\":2,\"retention_window\":null,\"wal_depth\":null,\"time\":\"\"}").unwrap();
        let r: SettingsRecord = newest(&*repo, "w").unwrap().unwrap();
        assert_eq!(r.settings.retention_redundancy, Some(2));
        let s = r.settings.overlay(&Settings {
            retention_window: Some(7),
            ..Default::default()
        });
        assert_eq!(
            (s.retention_redundancy, s.retention_window),
            (Some(2), Some(7))
        );
        let s = s.overlay(&Settings {
            retention_redundancy: Some(0),
            ..Default::default()
        });
        assert_eq!(s.retention_redundancy, None);
        // a newer record sorts after, even within the same second
        put_record(&*repo, "w", b"{}", 0).unwrap();
        assert!(repo.list("w").unwrap().objects.len() == 3);
    }
}
