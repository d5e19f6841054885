//! Data-page verification: PostgreSQL's page checksum and page-header sanity check.
//!
//! The checksum is PostgreSQL's `pg_checksum_page` (`src/include/storage/checksum_impl.h`):
//! 32 interleaved FNV-1a-like hashes over the page read as native (little-endian) `u32`
//! words, with `pd_checksum` taken as zero, two extra rounds of zeros, XOR-folded, mixed
//! with the block number and reduced to 1..=65535. The block number is the block's number
//! in the whole relation fork: `blkno_in_file + segno * RELSEG_SIZE`.
//!
//! Page header (`PageHeaderData`, bufpage.h), little-endian:
//! ```text
//! Format: { 0 pd_lsn {xlogid u32, xrecoff u32} | 8 pd_checksum u16 | 10 pd_flags u16
//!           12 pd_lower u16 | 14 pd_upper u16 | 16 pd_special u16
//!           18 pd_pagesize_version u16 | 20 pd_prune_xid u32 }  (24 bytes)
//! ```

use crate::types::Lsn;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// `PD_VALID_FLAG_BITS`: every other pd_flags bit must be clear.
const PD_VALID_FLAG_BITS: u16 = 0x0007;
/// `SizeOfPageHeaderData`.
pub const PAGE_HEADER_SIZE: usize = 24;

/// Seeds of the 32 parallel hashes (fixed by PostgreSQL's on-disk format).
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline(always)]
fn comp(sum: &mut u32, value: u32) {
    let tmp = *sum ^ value;
    *sum = tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17);
}

/// `pg_checksum_page`. `page.len()` must be a multiple of 128 (every BLCKSZ is); the
/// checksum field (bytes 8..10) is treated as zero.
pub fn checksum_page(page: &[u8], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for (row, chunk) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, w) in chunk.chunks_exact(4).enumerate() {
            let mut word = [0u8; 4];
            word.copy_from_slice(w);
            let mut v = u32::from_le_bytes(word);
            if row == 0 && j == 2 {
                // bytes 8..12: pd_checksum (low half) and pd_flags (high half)
                v &= 0xFFFF_0000;
            }
            comp(&mut sums[j], v);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            comp(s, 0);
        }
    }
    let mut result = sums.iter().fold(0u32, |a, s| a ^ s);
    result ^= blkno;
    ((result % 65535) + 1) as u16
}

fn u16_at(p: &[u8], off: usize) -> u16 {
    match p.get(off..off + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

/// The page's LSN (`pd_lsn`).
pub fn page_lsn(page: &[u8]) -> Lsn {
    let hi = page
        .get(0..4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    let lo = page
        .get(4..8)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    Lsn(((hi as u64) << 32) | lo as u64)
}

pub fn is_all_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// The outcome of checking one page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageCheck {
    Valid,
    /// All-zero page: valid (extended but never written).
    Zero,
    /// Fails; the text says why.
    Bad(String),
}

/// PostgreSQL's `PageIsVerified` rules: a zero page is valid; otherwise the header must be
/// sane and, with checksums on, the checksum must match.
pub fn check_page(page: &[u8], blkno: u32, checksums: bool) -> PageCheck {
    if page.len() < PAGE_HEADER_SIZE || !page.len().is_multiple_of(128) {
        return PageCheck::Bad(format!("page of {} bytes", page.len()));
    }
    let flags = u16_at(page, 10);
    let lower = u16_at(page, 12) as usize;
    let upper = u16_at(page, 14) as usize;
    let special = u16_at(page, 16) as usize;
    let header_ok = flags & !PD_VALID_FLAG_BITS == 0
        && lower <= upper
        && upper <= special
        && special <= page.len()
        && special.is_multiple_of(8);
    if !header_ok {
        if is_all_zero(page) {
            return PageCheck::Zero;
        }
        return PageCheck::Bad(format!(
            "invalid page header (flags 0x{flags:04X}, lower {lower}, upper {upper}, special {special})"
        ));
    }
    if checksums {
        let stored = u16_at(page, 8);
        let computed = checksum_page(page, blkno);
        if stored != computed {
            if is_all_zero(page) {
                return PageCheck::Zero;
            }
            return PageCheck::Bad(format!(
                "checksum mismatch (stored 0x{stored:04X}, computed 0x{computed:04X})"
            ));
        }
    }
    PageCheck::Valid
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page image with a header and some content, its checksum set for `blkno`.
    pub(crate) fn sample_page(blkno: u32, lsn: u64) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
        p[12..14].copy_from_slice(&28u16.to_le_bytes());
        p[14..16].copy_from_slice(&8000u16.to_le_bytes());
        p[16..18].copy_from_slice(&8192u16.to_le_bytes());
        p[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes());
        for (i, b) in p[8000..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let c = checksum_page(&p, blkno);
        p[8..10].copy_from_slice(&c.to_le_bytes());
        p
    }

    #[test]
    fn checksum_ignores_its_own_field_and_mixes_block_number() {
        let p = sample_page(5, 0x1_0000_0028);
        assert_eq!(check_page(&p, 5, true), PageCheck::Valid);
        assert!(matches!(check_page(&p, 6, true), PageCheck::Bad(_)));
        let mut q = p.clone();
        q[5000] ^= 1;
        assert!(matches!(check_page(&q, 5, true), PageCheck::Bad(_)));
        assert_eq!(check_page(&q, 5, false), PageCheck::Valid);
        assert_eq!(page_lsn(&p), Lsn(0x1_0000_0028));
    }

    #[test]
    fn zero_page_is_valid_and_bad_header_is_not() {
        assert_eq!(check_page(&[0u8; 8192], 9, true), PageCheck::Zero);
        let mut p = sample_page(0, 1);
        p[12..14].copy_from_slice(&9000u16.to_le_bytes());
        assert!(matches!(check_page(&p, 0, false), PageCheck::Bad(_)));
    }
}
