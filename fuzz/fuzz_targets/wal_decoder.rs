//! Arbitrary bytes into the WAL decoder and the segment indexer: errors are fine, panics
//! are not. The first byte picks the chunk size, so the reassembly paths are exercised too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walnut::index::build::index_segment;
use walnut::wal::{WalParams, WalStreamDecoder};
use walnut::{Lsn, PgVersion};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + (sel as usize % 64) * 37;
    // From a segment start: parameters come from the long header in the data.
    let mut d = WalStreamDecoder::new(Lsn(0x0100_0000));
    for c in rest.chunks(chunk) {
        d.feed_bytes(c);
        while let Ok(Some(r)) = d.poll_decode() {
            let _ = (r.blocks.len(), r.main_data.len(), &r.event);
        }
    }
    // Mid-stream with known parameters: no page header needed at the start.
    let params = WalParams {
        version: PgVersion::ALL[sel as usize % 6],
        seg_size: 1 << 20,
        page_size: 8192,
        system_id: 1,
    };
    if let Ok(mut d) = WalStreamDecoder::with_params(Lsn(0x0100_0028), params) {
        let _ = d.decode_all(rest, |_| Ok(true));
    }
    let mut next = |_: u64| Ok(None);
    let _ = index_segment(1, 1, rest, &mut next);
});
