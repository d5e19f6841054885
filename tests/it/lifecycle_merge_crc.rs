//! `walnut merge` of an uncompressed chain writes the merged FULL's block checksums
//! (`block_crcs`), so a checksum-mode incremental restore of the merged FULL reads only
//! the differing blocks, and gives byte for byte what a full restore gives.
use super::env::*;
use super::harness::*;
use super::lifecycle_util::merge;
use super::restore_incremental::{bytes_written, incremental};
use super::restore_incremental_crc::{crc_chain, kept_unread, same_as_full_restore_and_dump};

#[test]
fn merged_full_has_block_checksums_for_checksum_mode_restore() {
    let env = Env::new("life-merge-crc");
    let cat = env.cat();
    // a copy of the FULL that goes its own way (restored before the merge replaces it)
    let (_full, copy, delta, want) = crc_chain(&env, 2, |pg| {
        pg.pgbench(&["-n", "-t", "300", "-c", "1", "postgres"]);
        pg.psql("postgres", "create table only_in_copy as select 1 as i");
        pg.psql("postgres", "checkpoint");
    });

    let r: serde_json::Value = serde_json::from_str(&ok(merge(cat, &delta), "merge")).unwrap();
    let m = r["merged_id"].as_str().unwrap().to_string();
    // unchanged files are linked; their block checksums come from the old backups' own
    // (validate below checks each file's list against its manifest CRC)
    assert!(r["linked_files"].as_u64().unwrap() > 0, "{r}");
    // backup.json names the object, as a backup's does, and it is there at that size
    let bj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.backup_dir(&m).join("backup.json")).unwrap())
            .unwrap();
    let size = bj["block_crcs"]["size"]
        .as_u64()
        .unwrap_or_else(|| panic!("merged backup.json has no block_crcs: {bj}"));
    assert!(bj["block_crcs"]["crc32c"].is_u64(), "{bj}");
    let obj = env.backup_dir(&m).join("block_crcs");
    assert_eq!(std::fs::metadata(&obj).unwrap().len(), size);
    // validate checks the object against the manifest's CRCs
    ok(env.validate(&["-i", &m]), "validate the merged FULL");
    ok(env.validate(&[]), "validate");

    let fresh = env.path("fresh");
    ok(env.restore_cmd(&fresh, &["-i", &m]), "full restore");
    let out = ok(
        incremental(&env, &copy.data, "checksum", &["-i", &m]),
        "incremental restore (checksum) of the merged FULL",
    );
    eprintln!("checksum: {}", out.trim());
    let (written, total) = bytes_written(&out);
    let kept = kept_unread(&out);
    assert!(written > 0, "nothing written");
    assert!(
        kept > 0,
        "{kept} blocks kept unread: the block checksums were not used"
    );
    assert!(
        written * 2 < total,
        "{written} of {total} bytes written, expected under a half"
    );
    same_as_full_restore_and_dump(
        &env,
        &fresh,
        &copy.data,
        &want,
        "checksum over the merged FULL",
    );
}
