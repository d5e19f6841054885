//! `walnut show`: the backups of one or all instances, as a table or JSON.

use serde::Serialize;

use crate::catalog::Catalog;
use crate::error::Result;

use super::meta::{self, BackupMeta};

/// One row of `show` (JSON keys are a contract for scripts).
#[derive(Clone, Debug, Serialize)]
pub struct BackupRow {
    pub instance: String,
    pub id: String,
    pub mode: String,
    pub status: String,
    pub parent_id: Option<String>,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: Option<String>,
    pub start_time: String,
    pub end_time: Option<String>,
    pub recovery_time: Option<String>,
    pub recovery_xid: Option<u64>,
    pub data_bytes: u64,
    pub files: u64,
    pub compress: String,
    pub error: Option<String>,
    /// A STREAM backup (carries its own WAL).
    pub stream: bool,
    /// Taken from a standby.
    pub from_standby: bool,
    /// Where a PAGE backup's change map came from: "index" (walnut's WAL index) or
    /// "summary" (the server's WAL summaries); null for FULL and DELTA.
    pub source: Option<String>,
    /// Pinned until (set-backup), when pinned now.
    pub expire_time: Option<String>,
    /// The backup's note (set-backup --note).
    pub note: Option<String>,
    /// The newest `verify-restore` drill of this backup: "PASSED" or "FAILED" (none yet:
    /// absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_restore: Option<String>,
    /// When that drill ended (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_restore_time: Option<String>,
    /// The PITR windows: per timeline, from the consistency point to the first gap or
    /// segment without a usable index (from the block indexes; see
    /// [`crate::archive::show::horizons`]).
    pub pitr: Vec<crate::archive::show::Horizon>,
}

impl From<&BackupMeta> for BackupRow {
    fn from(b: &BackupMeta) -> BackupRow {
        BackupRow {
            instance: b.instance.clone(),
            id: b.id.clone(),
            mode: b.mode.to_string(),
            status: b.effective_status().to_string(),
            parent_id: b.parent_id.clone(),
            timeline: b.timeline,
            start_lsn: b.start_lsn.to_string(),
            stop_lsn: b.stop_lsn.map(|l| l.to_string()),
            start_time: b.start_time.clone(),
            end_time: b.end_time.clone(),
            recovery_time: b.recovery_time.clone(),
            recovery_xid: b.recovery_xid,
            data_bytes: b.data_bytes,
            files: b.files,
            compress: b.compress.clone(),
            error: b.error.clone(),
            stream: b.stream,
            from_standby: b.from_standby,
            source: (b.mode == super::meta::Mode::Page).then(|| {
                b.change_source
                    .unwrap_or(super::meta::ChangeSource::Index)
                    .to_string()
            }),
            expire_time: None,
            note: None,
            verify_restore: None,
            verify_restore_time: None,
            pitr: Vec::new(),
        }
    }
}

/// Rows for `instance` (all instances when `None`), newest last; one backup with `id`.
pub fn rows(catalog: &Catalog, instance: Option<&str>, id: Option<&str>) -> Result<Vec<BackupRow>> {
    let names = match instance {
        Some(i) => {
            catalog.instance(i)?;
            vec![i.to_string()]
        }
        None => catalog.instances()?,
    };
    let mut out = Vec::new();
    for n in names {
        let list = meta::list(catalog, &n)?;
        // an unreadable archive leaves the windows empty; show still lists the backups
        let mut windows = match crate::archive::WalArchive::open(catalog, &n)
            .and_then(|ar| crate::archive::show::horizons(&ar, &list))
        {
            Ok(w) => w,
            Err(e) => {
                log::warn!("instance \"{n}\": no PITR windows: {e}");
                Default::default()
            }
        };
        for b in list {
            if id.is_none_or(|i| i == b.id) {
                let mut row = BackupRow::from(&b);
                row.pitr = windows.remove(&b.id).unwrap_or_default();
                // a damaged pin record is reported, not fatal to the listing (delete refuses
                // on it instead)
                match crate::lifecycle::records::load_pin(catalog, &n, &b.id) {
                    Ok(pin) => {
                        if pin.pinned_at(crate::lifecycle::records::now_secs()) {
                            row.expire_time = pin.expire_time;
                        }
                        row.note = pin.note;
                    }
                    Err(e) => log::warn!("backup {}: {e}", b.id),
                }
                // a damaged verify record is reported, and shows as no result
                match crate::verify_restore::latest(catalog, &n, &b.id) {
                    Ok(Some(v)) => {
                        row.verify_restore =
                            Some(if v.success { "PASSED" } else { "FAILED" }.to_string());
                        row.verify_restore_time = Some(v.end_time);
                    }
                    Ok(None) => {}
                    Err(e) => log::warn!("backup {}: verify-restore record: {e}", b.id),
                }
                out.push(row);
            }
        }
    }
    if let Some(i) = id {
        if out.is_empty() {
            return Err(crate::error::Error::not_found(format!(
                "backup {i} not found"
            )));
        }
    }
    Ok(out)
}
