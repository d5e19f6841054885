//! pg_control parsing checked against `pg_controldata`, an oracle nobody here wrote.
use super::harness::*;
use walnut::pgcontrol::ControlFile;

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim_start_matches(':').trim())
        })
        .unwrap_or_else(|| panic!("pg_controldata has no {name}"))
}

#[test]
fn pg_control_matches_pg_controldata() {
    let dir = pg_tempdir("pgcontrol");
    for (name, args) in [("k", vec!["-k", "--wal-segsize=1"]), ("nok", vec![])] {
        let mut pg = Pg::init(&pg_bin(), dir.path(), name, &args);
        pg.start();
        pg.psql("postgres", "checkpoint");
        let c = ControlFile::read_from_pgdata(&pg.data).unwrap();
        let mut cmd = pg.cmd("pg_controldata");
        cmd.arg("-D").arg(&pg.data).env("LC_ALL", "C");
        let out = run_ok(&mut cmd);
        assert_eq!(
            c.system_id.to_string(),
            field(&out, "Database system identifier")
        );
        assert_eq!(
            c.checkpoint.to_string(),
            field(&out, "Latest checkpoint location")
        );
        assert_eq!(
            c.redo.to_string(),
            field(&out, "Latest checkpoint's REDO location")
        );
        assert_eq!(
            c.timeline.to_string(),
            field(&out, "Latest checkpoint's TimeLineID")
        );
        assert_eq!(
            c.wal_segment_size.to_string(),
            field(&out, "Bytes per WAL segment")
        );
        assert_eq!(c.block_size.to_string(), field(&out, "Database block size"));
        assert_eq!(
            c.relseg_size.to_string(),
            field(&out, "Blocks per segment of large relation")
        );
        assert_eq!(c.wal_page_size.to_string(), field(&out, "WAL block size"));
        assert_eq!(
            c.data_checksum_version.to_string(),
            field(&out, "Data page checksum version")
        );
        assert_eq!(c.state, walnut::pgcontrol::DbState::InProduction);
        assert_eq!(
            walnut::pgcontrol::read_pg_version_file(&pg.data).unwrap(),
            15
        );
        pg.stop();
        let c = ControlFile::read_from_pgdata(&pg.data).unwrap();
        assert!(c.state.is_shut_down());
    }
}
