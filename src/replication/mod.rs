//! The replication client: a small blocking client for PostgreSQL's physical replication
//! protocol (walsender), over `std` TCP and Unix sockets, built on `postgres-protocol`'s
//! message codecs (released `tokio-postgres` cannot open a replication connection).
//!
//! - [`ReplConnection`]: startup with `replication=true` and `application_name`;
//!   trust, cleartext password, md5 and SCRAM-SHA-256; `IDENTIFY_SYSTEM`,
//!   `TIMELINE_HISTORY`, `CREATE_REPLICATION_SLOT … PHYSICAL`, `DROP_REPLICATION_SLOT`,
//!   `READ_REPLICATION_SLOT`, `START_REPLICATION`.
//! - [`ReplicationStream`]: the CopyBoth stream as a poll API of [`Event`]s, with status
//!   updates (replies at once to `replyRequested`, at least every 10 s, flush only as the
//!   consumer reports it).
//! - [`SegmentAssembler`]: sans-IO, streamed WAL → whole segments and a `.partial` tail.
//!
//! ```ignore
//! let mut conn = ReplConnection::connect(&ReplConfig::new("/run/postgresql", 5432, "postgres"))?;
//! let id = conn.identify_system()?;
//! let start = Lsn(id.xlogpos.0 - id.xlogpos.segment_offset(seg_size));
//! let mut asm = SegmentAssembler::new(id.timeline, seg_size, start)?;
//! let mut stream = conn.start_replication(None, start, id.timeline)?;
//! loop {
//!     match stream.next_event(Duration::from_secs(1))? {
//!         Event::Data { start, bytes, .. } => for seg in asm.push(start, &bytes)? { /* store, fsync */ },
//!         Event::EndOfTimeline { next_tli, switchpoint } => { /* switch_timeline, restart */ break }
//!         _ => {}
//!     }
//!     stream.report_flushed(/* what is durable */)?;
//! }
//! ```

mod assembler;
mod commands;
mod conn;
mod msg;
mod stream;

pub use assembler::{CompleteSegment, PartialTail, SegmentAssembler, BUFFER_ALIGN};
pub use commands::{
    check_slot_name, create_slot_command, CreatedSlot, SlotState, SystemIdentity, TimelineHistory,
};
pub use conn::{QueryResult, ReplConfig, ReplConnection, ServerError};
pub use msg::{parse_server_copy_data, PgTime, ServerCopyData, StatusUpdate};
pub use stream::{Event, ReplicationStream};

#[cfg(test)]
mod tests;
