//! Builds the synthetic catalog of contrib/bench-lifecycle.sh (`bench_delete`): 50 backups
//! (a FULL every 7th, PAGE in between, one a day) and 10,000 archived segments with their
//! indexes, written through the library (no server). Run by the script only:
//! `WALNUT_BENCH_CATALOG=DIR cargo test --test it lifecycle_bench -- --ignored`.
use walnut::backup::meta::{self, BackupMeta};
use walnut::catalog::{Catalog, InstanceConfig};

const SEG: u32 = 16 << 20;

#[test]
#[ignore = "builds the benchmark catalog for contrib/bench-lifecycle.sh"]
fn lifecycle_bench_build_synthetic_catalog() {
    let Some(dir) = std::env::var_os("WALNUT_BENCH_CATALOG") else {
        panic!("set WALNUT_BENCH_CATALOG");
    };
    let root = std::path::PathBuf::from(dir);
    let catalog = Catalog::init(&root).unwrap();
    catalog
        .save_instance(&InstanceConfig {
            name: "db".into(),
            system_id: 7,
            pg_major: 15,
            wal_segment_size: SEG,
            wal_page_size: 8192,
            block_size: 8192,
            relseg_size: 131072,
            data_checksums: true,
            pgdata: "/nonexistent".into(),
            host: None,
            port: None,
            user: None,
            dbname: None,
        })
        .unwrap();
    let repo = catalog.repo();
    let wal = Catalog::wal_key("db");
    for s in 1..=10_000u64 {
        let name = walnut::WalFileName::segment(1, s, SEG).to_string();
        repo.put_new(&format!("{wal}/00000001/{name}.lz4"), b"segment")
            .unwrap();
        repo.put_new(&format!("{wal}/00000001/{name}.idx"), b"index")
            .unwrap();
    }
    let day0: i64 = 1_750_000_000;
    let mut parent: Option<String> = None;
    for i in 0..50u64 {
        let full = i % 7 == 0;
        let id = format!("B{i:03}");
        let start = (i * 200 + 10) * u64::from(SEG) + 40;
        let t = day0 + i as i64 * 86400;
        let m: BackupMeta = serde_json::from_value(serde_json::json!({
            "format": meta::META_FORMAT, "id": id, "instance": "db",
            "mode": if full { "FULL" } else { "PAGE" }, "status": "OK",
            "parent_id": if full { None } else { parent.clone() }, "timeline": 1,
            "start_lsn": format!("{:X}/{:X}", start >> 32, start as u32),
            "stop_lsn": format!("{:X}/{:X}", (start + u64::from(SEG)) >> 32, (start + u64::from(SEG)) as u32),
            "parent_start_lsn": null, "start_time": meta::format_utc(t),
            "end_time": meta::format_utc(t + 60), "recovery_time": meta::format_utc(t + 60),
            "recovery_epoch": t + 60, "recovery_xid": 1000 + i,
            "data_bytes": 0, "files": 20, "compress": "lz4", "pg_major": 15, "system_id": 7,
            "block_size": 8192, "relseg_size": 131072, "wal_segment_size": SEG,
            "data_checksums": true, "pid": null, "error": null
        }))
        .unwrap();
        let key = m.key().unwrap();
        repo.put_new(
            &format!("{key}/{}", meta::STARTED_FILE),
            &meta::encode(&m).unwrap(),
        )
        .unwrap();
        for f in 0..20 {
            repo.put_new(&format!("{key}/database/base/5/{}", 16384 + f), b"data")
                .unwrap();
        }
        meta::save_complete(&catalog, &m).unwrap();
        parent = Some(id);
    }
}
