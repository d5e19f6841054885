//! Locks on object storage: leases with an expiry, so that a lock left by a dead process
//! (or a dead host) is taken over, and two hosts exclude each other.
//!
//! A lock named `KEY` is the set of *lease objects* under `KEY/` (the key's last component
//! starts with `.`, so listings of the catalog never show them). Each taker writes its own
//! object, named uniquely: `MODE-SECS-HOST-PID-NONCE` (`MODE` is `x` exclusive or `s`
//! shared, `SECS` the lease's duration). Then it lists `KEY/`:
//! - an exclusive taker holds the lock when no *other live* lease is there; a shared taker
//!   when no other live exclusive lease is there;
//! - otherwise it deletes its own object and gives up (`wait` false) or retries after a
//!   jittered pause.
//!
//! Why this is safe without conditional writes (Garage ignores `If-None-Match`): every
//! name is unique, so nothing is overwritten, and listings are strongly consistent after a
//! completed PUT (AWS S3 since 2020, Garage, s3s-fs). Of two takers, the one that lists
//! second always sees the other's object, so at most one of them holds; both may back off
//! (jitter makes a retry win). No `If-None-Match` or read-back is needed, so the same code
//! runs whatever `walnut init`'s probe recorded.
//!
//! A lease is *live* until the server's clock (the `Date` of the listing's answer) passes
//! its object's `LastModified` plus its `SECS` (plus one second for the `Date`'s
//! resolution): both are the server's clock, so client clocks need not agree. While held, a
//! heartbeat thread rewrites the holder's own object every third of the lease (the only
//! objects walnut ever rewrites, and only their writer does). Expired leases are ignored and
//! deleted by the next taker ("taken over"). A holder that cannot renew for a whole lease
//! (the server unreachable that long) may lose its lock: that is logged as an error. On
//! release the object is deleted; a release that fails leaves the lease to expire.
//!
//! The duration is [`super::S3Config::lease`] (`WALNUT_S3_LEASE_SECS`, default 60 s): a
//! killed backup shows RUNNING until then, after which `show` calls it ERROR.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{header, Backoff, Inner};
use crate::error::{Error, ErrorKind, Result};
use crate::repo::LockMode;

/// The lease when no setting gives one.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Overrides the lease duration (seconds; tests use a few).
pub const LEASE_ENV: &str = "WALNUT_S3_LEASE_SECS";
/// How long a release may try to delete its lease object (then it expires by itself).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// One lease object found under a lock's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub name: String,
    /// `LastModified`, in Unix milliseconds (None when the server gave none).
    pub modified_ms: Option<i64>,
}

/// What a lease object's name says: its mode and duration (an unknown name counts as an
/// exclusive lease of the default duration: never ignored).
fn parse_name(name: &str) -> (LockMode, u64) {
    let mut it = name.splitn(3, '-');
    let mode = match it.next() {
        Some("s") => LockMode::Shared,
        _ => LockMode::Exclusive,
    };
    let secs = it
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_LEASE.as_secs());
    (mode, secs)
}

/// Whether the lease `e` is over at the server's time `now_ms`. A lease without a
/// modification time never expires (nothing proves it is over).
fn expired(e: &Entry, now_ms: i64) -> bool {
    let (_, secs) = parse_name(&e.name);
    e.modified_ms.is_some_and(|m| {
        now_ms > m.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX / 2000) * 1000 + 1000)
    })
}

/// Whether another holder's live lease in `theirs` mode keeps us (in `ours`) out.
fn conflicts(ours: LockMode, theirs: LockMode) -> bool {
    ours == LockMode::Exclusive || theirs == LockMode::Exclusive
}

/// `[A-Za-z0-9]` of the host name, at most 32: a readable part of a holder's name.
fn host_part() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    if h.is_empty() {
        "host".into()
    } else {
        h
    }
}

/// A held lease: renewed by its thread until dropped, then deleted.
pub(super) struct Lease {
    inner: Arc<Inner>,
    /// The relative key of our lease object.
    key: String,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let full = self.inner.full(&self.key);
        if let Err(e) = self.inner.delete_within(&full, RELEASE_TIMEOUT) {
            log::warn!("could not release the lock (it expires by itself): {e}");
        }
    }
}

/// Takes the lease lock `key` (see the module docs); `None` when `wait` is false and a
/// live conflicting lease is there.
pub(super) fn take(
    inner: &Arc<Inner>,
    key: &str,
    mode: LockMode,
    wait: bool,
) -> Result<Option<Lease>> {
    let secs = inner.cfg.lease.as_secs().max(1);
    let nonce = RandomState::new().build_hasher().finish();
    let me = format!(
        "{}-{secs}-{}-{}-{nonce:016x}",
        if mode == LockMode::Shared { "s" } else { "x" },
        host_part(),
        std::process::id()
    );
    let own = format!("{key}/{me}");
    let body = serde_json::json!({
        "holder": me,
        "pid": std::process::id(),
        "mode": if mode == LockMode::Shared { "shared" } else { "exclusive" },
        "lease_seconds": secs,
    })
    .to_string();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        inner.put_once(&own, body.as_bytes(), false)?;
        let (entries, now_ms) = match list(inner, key) {
            Ok(x) => x,
            Err(e) => {
                let _ = inner.delete_within(&inner.full(&own), RELEASE_TIMEOUT);
                return Err(e);
            }
        };
        let mut blocker = None;
        let mut stale = Vec::new();
        for e in entries.iter().filter(|e| e.name != me) {
            if expired(e, now_ms) {
                stale.push(e);
            } else if conflicts(mode, parse_name(&e.name).0) {
                blocker = Some(e);
            }
        }
        match blocker {
            None => {
                for e in stale {
                    log::info!(
                        "{}: taking over the expired lease {}",
                        inner.describe(key),
                        e.name
                    );
                    if let Err(err) = inner.delete_full(&inner.full(&format!("{key}/{}", e.name))) {
                        log::warn!("could not delete the expired lease: {err}");
                    }
                }
                return Ok(Some(start(inner, own, body, secs)));
            }
            Some(b) => {
                log::debug!("{}: held by {}", inner.describe(key), b.name);
                inner.delete_full(&inner.full(&own))?;
                if !wait {
                    return Ok(None);
                }
            }
        }
        backoff.pause(Duration::MAX);
    }
}

/// Starts the heartbeat of a lease just taken.
fn start(inner: &Arc<Inner>, own: String, body: String, secs: u64) -> Lease {
    let (tx, rx) = channel::<()>();
    let lease = Duration::from_secs(secs);
    let every = lease / 3;
    let (i2, k2) = (inner.clone(), own.clone());
    let thread = std::thread::spawn(move || {
        let mut renewed = Instant::now();
        let mut due = renewed + every;
        let mut lost = false;
        loop {
            match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            match i2.put_once(&k2, body.as_bytes(), false) {
                Ok(_) => {
                    renewed = Instant::now();
                    due = renewed + every;
                }
                Err(e) => {
                    if !lost && renewed.elapsed() >= lease {
                        lost = true;
                        log::error!(
                            "lease {k2}: not renewed for {secs} s, the lock may be taken over: {e}"
                        );
                    } else {
                        log::warn!("lease {k2}: renewal failed, retrying: {e}");
                    }
                    due = Instant::now() + Duration::from_secs(1).min(every);
                }
            }
        }
    });
    Lease {
        inner: inner.clone(),
        key: own,
        stop: Some(tx),
        thread: Some(thread),
    }
}

/// The lease objects under `key/`, and the server's time of the answer (Unix ms; the local
/// clock when the answer has no `Date`).
pub(super) fn list(inner: &Inner, key: &str) -> Result<(Vec<Entry>, i64)> {
    let dir = format!("{}/", inner.full(key));
    let what = format!(
        "S3 {} bucket {} lock {}",
        inner.cfg.endpoint,
        inner.cfg.bucket,
        inner.full(key)
    );
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut now_ms = None;
    loop {
        let mk = || inner.list_req(&dir, false, token.as_deref());
        let mut resp = inner.send(&what, "LIST", &mk)?;
        if resp.status().as_u16() != 200 {
            return Err(inner.status_error(&what, "LIST", resp));
        }
        if now_ms.is_none() {
            now_ms = header(&resp, "date").and_then(parse_http_date);
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| Error::new(ErrorKind::Io, format!("{what}: LIST: {e}")))?;
        let page = rusty_s3::actions::ListObjectsV2::parse_response(&text)
            .map_err(|e| Error::corruption(format!("{what}: LIST: unreadable answer ({e})")))?;
        for o in page.contents {
            let Some(name) = o.key.strip_prefix(&dir) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            out.push(Entry {
                name: name.to_string(),
                modified_ms: o.last_modified.as_deref().and_then(parse_rfc3339),
            });
        }
        match page.next_continuation_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    let now = now_ms.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    });
    Ok((out, now))
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn unix_ms(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, ms: i64) -> Option<i64> {
    let ok = (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0..=60).contains(&s);
    ok.then(|| ((days_from_civil(y, mo, d) * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms)
}

/// `2020-12-01T20:43:11.794Z` (S3's `LastModified`) in Unix ms.
fn parse_rfc3339(t: &str) -> Option<i64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut c = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (h, mi, s) = (c.next()??, c.next()??, c.next()??);
    let ms = if frac.is_empty() {
        0
    } else {
        let f: String = frac.chars().chain("000".chars()).take(3).collect();
        f.parse().ok()?
    };
    unix_ms(y, mo, day, h, mi, s, ms)
}

/// `Mon, 30 Nov 2026 00:44:46 GMT` (an HTTP `Date`) in Unix ms.
fn parse_http_date(t: &str) -> Option<i64> {
    let w: Vec<&str> = t.split_whitespace().collect();
    let [_, day, mon, year, hms, "GMT"] = w.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mo = MONTHS.iter().position(|m| m == mon)? as i64 + 1;
    let mut c = hms.splitn(3, ':').map(|v| v.parse::<i64>().ok());
    let (h, mi, s) = (c.next()??, c.next()??, c.next()??);
    unix_ms(year.parse().ok()?, mo, day.parse().ok()?, h, mi, s, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_names_and_expiry() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            parse_rfc3339("2020-12-01T20:43:11.794Z"),
            Some(1_606_855_391_794)
        );
        assert_eq!(
            parse_rfc3339("2020-12-01T20:43:11Z"),
            Some(1_606_855_391_000)
        );
        assert_eq!(parse_rfc3339("2020-13-01T20:43:11Z"), None);
        assert_eq!(
            parse_http_date("Tue, 01 Dec 2020 20:43:11 GMT"),
            Some(1_606_855_391_000)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(parse_name("s-30-h-1-ab"), (LockMode::Shared, 30));
        assert_eq!(parse_name("x-5-h-1-ab"), (LockMode::Exclusive, 5));
        assert_eq!(
            parse_name("junk"),
            (LockMode::Exclusive, DEFAULT_LEASE.as_secs())
        );
        let e = Entry {
            name: "x-5-h-1-ab".into(),
            modified_ms: Some(10_000),
        };
        assert!(!expired(&e, 16_000));
        assert!(expired(&e, 16_001));
        let none = Entry {
            modified_ms: None,
            ..e
        };
        assert!(!expired(&none, i64::MAX));
        assert!(conflicts(LockMode::Shared, LockMode::Exclusive));
        assert!(!conflicts(LockMode::Shared, LockMode::Shared));
        assert!(conflicts(LockMode::Exclusive, LockMode::Shared));
    }
}
