//! Integration tests: real PostgreSQL servers, real archive_command / restore_command.
mod env;
mod harness;

mod append_only;
mod archive;
mod archive_append_only;
mod archive_kill_heal;
mod backup;
mod backup_appendonly;
mod backup_compat;
mod catalog_hardening;
mod catalog_hardening_merge;
mod check_metrics;
mod cli_layers;
mod cli_synth;
mod fetch_hardening;
mod index_answers;
mod lifecycle_bench;
mod lifecycle_merge;
mod lifecycle_merge_crc;
mod lifecycle_merge_damage;
mod lifecycle_month;
mod lifecycle_retention;
mod lifecycle_safety;
mod lifecycle_timeline;
mod lifecycle_util;
mod matrix;
mod pgcontrol;
mod receive;
mod receive_spool;
mod replication;
mod restore_hardening;
mod restore_incremental;
mod restore_incremental_crc;
mod restore_lsn_index;
mod restore_partial;
mod restore_partial_hardening;
mod restore_plan_time;
mod s3;
mod s3_faults;
mod s3_lifecycle;
mod s3_lock_users;
mod s3_restore_power;
mod stream_standby;
mod stream_standby_busy;
mod summary;
mod take_hardening;
mod validate_hardening;
mod verify_restore;
mod wal_decoder;

mod smoke {
    use super::harness::*;

    /// The harness can start and stop a real server, and our binaries run.
    #[test]
    fn harness_starts_a_server() {
        let dir = pg_tempdir("smoke");
        let mut pg = Pg::init(&pg_bin(), dir.path(), "data", &["-k"]);
        pg.start();
        assert_eq!(pg.psql("postgres", "select 1+1"), "2");
        pg.stop();
        let out = run(std::process::Command::new(walnut_bin("walnut")).arg("--version"));
        assert!(out.status.success());
    }
}
