//! `walnut wal-index [--format json] SEGMENT_FILE...`
//!
//! Consecutive files are decoded as one stream (a record crossing a file boundary is
//! completed from the next file); a gap, or a file of another timeline, starts a new stream.
//! JSON output is one object per line and segment, a contract for scripts:
//!
//! ```text
//! {"segment": NAME, "blocks": [[spc, db, rel, fork, block], ...],
//!  "truncations": [[spc, db, rel, fork, limit], ...], "created": [[spc, db, rel, fork], ...],
//!  "dropped": [[spc, db, rel, fork], ...], "db_created": [[spc, db], ...],
//!  "db_dropped": [[spc, db], ...], "records": N, "start_lsn": "X/Y", "end_lsn": "X/Y",
//!  "pending": bool, "switched": bool, "limits": [[spc, db, rel, fork, limit], ...],
//!  "relmap": [[spc, db], ...], "wal_level_minimal": bool, "last_commit_time": N|null, ...}
//! ```
//!
//! `truncations` lists forks whose limit comes from truncation only (neither created nor
//! dropped); `limits` lists every fork's limit block.
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};

use crate::cli::OutputFormat;
use crate::error::{Error, IoContext, Result};
use crate::index::build::StreamIndexer;
use crate::index::{DbEventKind, OtherEvent, SegmentIndex};
use crate::types::{TimeLineId, WalFileName};
use crate::wal::read_long_header;

#[derive(Args, Debug, Clone)]
pub struct WalIndexArgs {
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Consecutive WAL segment files, decoded as one stream.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub fn run(args: WalIndexArgs) -> Result<i32> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut emit = |idx: &SegmentIndex| -> Result<()> {
        let text = match args.format {
            OutputFormat::Json => format!("{}\n", segment_json(idx)),
            OutputFormat::Text => segment_text(idx),
        };
        out.write_all(text.as_bytes())
            .ctx("write", Path::new("<stdout>"))
    };
    index_files(&args.files, &mut emit)?;
    Ok(0)
}

/// Indexes `files` in the order given, calling `emit` for each segment's index as soon as
/// it is final.
pub fn index_files(
    files: &[PathBuf],
    emit: &mut dyn FnMut(&SegmentIndex) -> Result<()>,
) -> Result<()> {
    let mut cur: Option<StreamIndexer> = None;
    let mut cur_tli: TimeLineId = 0;
    for path in files {
        let data = std::fs::read(path).ctx("read", path)?;
        let (tli, segno) = identify(path, &data)?;
        let continues = cur
            .as_ref()
            .is_some_and(|ix| cur_tli == tli && ix.next_segno() == Some(segno));
        if !continues {
            if let Some(ix) = cur.take() {
                for s in ix.finish()? {
                    emit(&s)?;
                }
            }
            cur = Some(StreamIndexer::new(tli));
            cur_tli = tli;
        }
        if let Some(ix) = cur.as_mut() {
            ix.feed_segment(segno, &data)
                .map_err(|e| e.context(path.display()))?;
            for s in ix.take_finished() {
                emit(&s)?;
            }
        }
    }
    if let Some(ix) = cur.take() {
        for s in ix.finish()? {
            emit(&s)?;
        }
    }
    Ok(())
}

/// Timeline and segment number: from the file name when it is a WAL name, else from the
/// segment's long page header.
fn identify(path: &Path, data: &[u8]) -> Result<(TimeLineId, u64)> {
    let h = read_long_header(data).map_err(|e| e.context(path.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name.parse::<WalFileName>() {
        Ok(n @ (WalFileName::Segment { .. } | WalFileName::Partial { .. })) => {
            if !n.fits_segment_size(h.seg_size) {
                return Err(Error::invalid(format!(
                    "{}: name does not fit {} byte segments",
                    path.display(),
                    h.seg_size
                )));
            }
            let segno = n.segno(h.seg_size).unwrap_or(0);
            Ok((n.tli(), segno))
        }
        _ => Ok((h.tli, h.segno())),
    }
}

fn seg_name(idx: &SegmentIndex) -> String {
    WalFileName::segment(idx.timeline, idx.segno, idx.seg_size).to_string()
}

/// One segment as the JSON object described in the module documentation.
pub fn segment_json(idx: &SegmentIndex) -> Value {
    let mut blocks = Vec::new();
    let mut truncations = Vec::new();
    let mut limits = Vec::new();
    let mut created = Vec::new();
    let mut dropped = Vec::new();
    for (k, f) in &idx.forks {
        for b in f.blocks.iter() {
            blocks.push(json!([k.spc, k.db, k.rel, k.fork, b]));
        }
        if let Some(l) = f.limit_block {
            limits.push(json!([k.spc, k.db, k.rel, k.fork, l]));
            if !f.created && !f.dropped {
                truncations.push(json!([k.spc, k.db, k.rel, k.fork, l]));
            }
        }
        if f.created {
            created.push(json!([k.spc, k.db, k.rel, k.fork]));
        }
        if f.dropped {
            dropped.push(json!([k.spc, k.db, k.rel, k.fork]));
        }
    }
    let mut db_created = Vec::new();
    let mut db_dropped = Vec::new();
    let mut db_events = Vec::new();
    for e in &idx.db_events {
        let (kind, src) = match e.kind {
            DbEventKind::CreatedFileCopy { src_spc, src_db } => {
                db_created.push(json!([e.spc, e.db]));
                ("file_copy", Some(json!([src_spc, src_db])))
            }
            DbEventKind::CreatedWalLog => {
                db_created.push(json!([e.spc, e.db]));
                ("wal_log", None)
            }
            DbEventKind::Dropped => {
                db_dropped.push(json!([e.spc, e.db]));
                ("dropped", None)
            }
        };
        let mut o = json!({"lsn": e.lsn.to_string(), "kind": kind, "spc": e.spc, "db": e.db});
        if let Some(s) = src {
            o["source"] = s;
        }
        db_events.push(o);
    }
    let mut relmap = Vec::new();
    let mut tablespaces_created = Vec::new();
    let mut tablespaces_dropped = Vec::new();
    let mut wal_levels = Vec::new();
    let mut restore_points = Vec::new();
    for e in &idx.other_events {
        match e {
            OtherEvent::RelmapUpdate { spc, db, .. } => relmap.push(json!([spc, db])),
            OtherEvent::TablespaceCreate { spc, .. } => tablespaces_created.push(json!(spc)),
            OtherEvent::TablespaceDrop { spc, .. } => tablespaces_dropped.push(json!(spc)),
            OtherEvent::WalLevel { lsn, wal_level } => {
                wal_levels.push(json!([lsn.to_string(), wal_level]))
            }
            OtherEvent::RestorePoint { lsn, name, time } => {
                restore_points.push(json!({"lsn": lsn.to_string(), "name": name, "time": time}))
            }
        }
    }
    json!({
        "segment": seg_name(idx),
        "blocks": blocks,
        "truncations": truncations,
        "created": created,
        "dropped": dropped,
        "db_created": db_created,
        "db_dropped": db_dropped,
        "records": idx.records,
        "start_lsn": idx.start_lsn.to_string(),
        "end_lsn": idx.end_lsn.to_string(),
        "pending": idx.pending,
        "switched": idx.switched,
        "limits": limits,
        "db_events": db_events,
        "relmap": relmap,
        "tablespaces_created": tablespaces_created,
        "tablespaces_dropped": tablespaces_dropped,
        "wal_levels": wal_levels,
        "restore_points": restore_points,
        "wal_level_minimal": idx.wal_level_minimal,
        "last_commit_time": idx.last_commit_time,
        "last_xid": idx.last_xid,
        "pg_major": idx.pg_major,
        "system_id": idx.system_id.to_string(),
    })
}

/// Compresses sorted block numbers into `a-b` ranges.
fn ranges(blocks: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        let mut end = start;
        while i + 1 < blocks.len() && blocks[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = blocks[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// One segment as text: a summary line, then one line per relation fork and per event.
pub fn segment_text(idx: &SegmentIndex) -> String {
    let mut s = format!(
        "segment {}: PostgreSQL {}, records {}, LSN {}..{}{}{}{}\n",
        seg_name(idx),
        idx.pg_major,
        idx.records,
        idx.start_lsn,
        idx.end_lsn,
        if idx.pending { ", pending" } else { "" },
        if idx.switched { ", switched" } else { "" },
        if idx.wal_level_minimal {
            ", wal_level=minimal seen"
        } else {
            ""
        },
    );
    const FORKS: [&str; 4] = ["main", "fsm", "vm", "init"];
    for (k, f) in &idx.forks {
        let blocks = f.blocks.to_vec();
        s.push_str(&format!(
            "  {}/{}/{} {}: {} blocks",
            k.spc,
            k.db,
            k.rel,
            FORKS.get(k.fork as usize).copied().unwrap_or("?"),
            blocks.len()
        ));
        if !blocks.is_empty() {
            s.push_str(&format!(" [{}]", ranges(&blocks)));
        }
        if let Some(l) = f.limit_block {
            s.push_str(&format!(", limit {l}"));
        }
        if f.created {
            s.push_str(", created");
        }
        if f.dropped {
            s.push_str(", dropped");
        }
        s.push('\n');
    }
    for e in &idx.db_events {
        let what = match e.kind {
            DbEventKind::CreatedFileCopy { src_spc, src_db } => {
                format!("created (file copy of {src_spc}/{src_db})")
            }
            DbEventKind::CreatedWalLog => "created (wal_log)".to_string(),
            DbEventKind::Dropped => "dropped".to_string(),
        };
        s.push_str(&format!(
            "  database {}/{} {what} at {}\n",
            e.spc, e.db, e.lsn
        ));
    }
    for e in &idx.other_events {
        let line = match e {
            OtherEvent::RelmapUpdate { lsn, spc, db } => {
                format!("relmap {spc}/{db} updated at {lsn}")
            }
            OtherEvent::TablespaceCreate { lsn, spc } => {
                format!("tablespace {spc} created at {lsn}")
            }
            OtherEvent::TablespaceDrop { lsn, spc } => format!("tablespace {spc} dropped at {lsn}"),
            OtherEvent::WalLevel { lsn, wal_level } => {
                let name = match wal_level {
                    0 => "minimal",
                    1 => "replica",
                    2 => "logical",
                    _ => "unknown",
                };
                format!("wal_level {wal_level} ({name}) at {lsn}")
            }
            OtherEvent::RestorePoint { lsn, name, time } => {
                format!("restore point '{name}' at {lsn} (time {time})")
            }
        };
        s.push_str(&format!("  {line}\n"));
    }
    if let Some(t) = idx.last_commit_time {
        s.push_str(&format!("  last commit/abort time {t}"));
        if let Some(x) = idx.last_xid {
            s.push_str(&format!(", xid {x}"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[1]), "1");
        assert_eq!(ranges(&[1, 2, 3, 5, 7, 8]), "1-3,5,7-8");
    }
}
