//! Block index file decoder: never panics, and whatever decodes round-trips.
//!
//! Half of the inputs are used raw (exercising length, magic, checksum and version checks);
//! the other half are wrapped as the body of a file with a valid header and checksum, so
//! that the fuzzer reaches the body parser instead of stopping at the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walnut::index::format::{decode, encode, MAGIC, VERSION};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&VERSION.to_le_bytes());
        f.extend_from_slice(&0u16.to_le_bytes());
        f.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        f.extend_from_slice(rest);
        let crc = crc32c(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    };
    if let Ok(index) = decode(&file, "fuzz") {
        let again = encode(&index);
        let back = decode(&again, "fuzz re-encoded").expect("an encoded index decodes");
        assert_eq!(back, index);
        // The encoding is canonical for what it produced.
        assert_eq!(encode(&back), again);
    }
});

/// CRC-32C (Castagnoli, reflected), bitwise: the fuzz crate does not depend on `crc32c`.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
