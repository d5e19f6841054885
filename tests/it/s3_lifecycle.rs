//! Lifecycle commands with the catalog on S3 (Garage, which ignores conditional create):
//! set-config/show-config, merge, delete --expired --delete-wal and set-backup work through
//! the repository layer exactly as on disk, and what is kept still restores from S3.
use super::env::Env;
use super::harness::*;
use super::s3::{
    archive_to_s3, backup_s3, restore_and_compare, s3_primary, stderr, walnut_s3, S3Server,
};

fn show_json(conf: &std::path::Path, url: &str) -> Vec<serde_json::Value> {
    let out = ok(
        walnut_s3(
            conf,
            &["show", "-B", url, "--instance", "db", "--format", "json"],
        ),
        "show on S3",
    );
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn ids_and_modes(conf: &std::path::Path, url: &str) -> Vec<(String, String)> {
    show_json(conf, url)
        .iter()
        .map(|b| {
            (
                b["id"].as_str().unwrap().to_string(),
                b["mode"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn lifecycle_on(s: S3Server) {
    let conf = s.config_file(10);
    let url = "s3://walnut/life";
    let dir = pg_tempdir("s3-life");
    let mut pg = s3_primary(&conf, url, dir.path());
    archive_to_s3(&mut pg, &conf, url);
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q", "postgres"]);
    // chain 1: FULL, PAGE; chain 2: FULL, PAGE, PAGE
    let mut ids = Vec::new();
    for mode in ["full", "page", "full", "page", "page"] {
        pg.pgbench(&["-t", "200", "-n", "postgres"]);
        ids.push(backup_s3(&conf, url, &pg, mode));
    }
    pg.pgbench(&["-t", "100", "-n", "postgres"]);
    let dump = Env::dumpall(&pg);
    pg.psql("postgres", "select pg_create_restore_point('after_all')");
    pg.switch_and_wait_archived();

    ok(
        walnut_s3(
            &conf,
            &[
                "set-config",
                "-B",
                url,
                "--instance",
                "db",
                "--retention-redundancy",
                "1",
            ],
        ),
        "set-config on S3",
    );
    let cfg = ok(
        walnut_s3(
            &conf,
            &[
                "show-config",
                "-B",
                url,
                "--instance",
                "db",
                "--format",
                "json",
            ],
        ),
        "show-config on S3",
    );
    assert!(cfg.contains("\"retention_redundancy\""), "{cfg}");
    assert!(cfg.contains('1'), "{cfg}");

    // merge the newest PAGE with its chain: one FULL replaces FULL2, PAGE2a, PAGE2b
    let out = ok(
        walnut_s3(
            &conf,
            &[
                "merge",
                "-B",
                url,
                "--instance",
                "db",
                "-i",
                &ids[4],
                "--format",
                "json",
            ],
        ),
        "merge on S3",
    );
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    let merged = rep["merged_id"].as_str().expect("merged_id").to_string();
    let now = ids_and_modes(&conf, url);
    assert!(
        now.contains(&(merged.clone(), "FULL".to_string())),
        "{now:?}"
    );
    for gone in &ids[2..] {
        assert!(
            !now.iter().any(|(i, _)| i == gone),
            "{gone} still listed: {now:?}"
        );
    }

    // a pin on chain 1's PAGE keeps chain 1 whatever the policy says
    ok(
        walnut_s3(
            &conf,
            &[
                "set-backup",
                "-B",
                url,
                "--instance",
                "db",
                "-i",
                &ids[1],
                "--ttl",
                "30d",
            ],
        ),
        "set-backup on S3",
    );
    let dry = ok(
        walnut_s3(
            &conf,
            &[
                "delete",
                "-B",
                url,
                "--instance",
                "db",
                "--expired",
                "--delete-wal",
                "--dry-run",
            ],
        ),
        "delete --dry-run on S3",
    );
    let now = ids_and_modes(&conf, url);
    assert_eq!(now.len(), 3, "a dry run deleted something\n{dry}\n{now:?}");
    // unpinned, chain 1 expires (redundancy 1 keeps the merged FULL only)
    ok(
        walnut_s3(
            &conf,
            &[
                "set-backup",
                "-B",
                url,
                "--instance",
                "db",
                "-i",
                &ids[1],
                "--ttl",
                "0",
            ],
        ),
        "unpin on S3",
    );
    let out = walnut_s3(
        &conf,
        &[
            "delete",
            "-B",
            url,
            "--instance",
            "db",
            "--expired",
            "--delete-wal",
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "delete on S3: {}", stderr(&out));
    let now = ids_and_modes(&conf, url);
    assert_eq!(now, vec![(merged.clone(), "FULL".to_string())], "{now:?}");
    ok(
        walnut_s3(&conf, &["validate", "-B", url, "--instance", "db"]),
        "validate on S3 after delete",
    );
    // the merged FULL restores, through WAL fetched from S3, to the final restore point
    restore_and_compare(&s, &conf, url, &pg, dir.path(), &merged, "after_all", &dump);
    pg.stop();
}

#[test]
fn s3_lifecycle_on_garage() {
    let Some(s) = S3Server::garage() else { return };
    lifecycle_on(s);
}
