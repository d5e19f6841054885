//! The client against a scripted fake walsender on a Unix socket: framing across reads
//! cut at every byte, CopyBoth, keepalive replies, the end-of-timeline exchange, errors.
//! (The real servers are in tests/it/replication.rs.)

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::Duration;

use super::*;
use crate::types::Lsn;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ready() -> Vec<u8> {
    frame(b'Z', b"I")
}

fn row_desc(cols: &[&str]) -> Vec<u8> {
    let mut b = (cols.len() as u16).to_be_bytes().to_vec();
    for c in cols {
        b.extend(cstr(c));
        b.extend_from_slice(&0u32.to_be_bytes()); // table oid
        b.extend_from_slice(&0u16.to_be_bytes()); // column
        b.extend_from_slice(&25u32.to_be_bytes()); // text
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
    }
    frame(b'T', &b)
}

fn data_row(vals: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = (vals.len() as u16).to_be_bytes().to_vec();
    for v in vals {
        match v {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    frame(b'D', &b)
}

fn complete(tag: &str) -> Vec<u8> {
    frame(b'C', &cstr(tag))
}

fn error(code: &str, msg: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (t, v) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', msg)] {
        b.push(t);
        b.extend(cstr(v));
    }
    b.push(0);
    frame(b'E', &b)
}

fn xlogdata(start: u64, data: &[u8]) -> Vec<u8> {
    let mut p = vec![b'w'];
    p.extend_from_slice(&start.to_be_bytes());
    p.extend_from_slice(&(start + data.len() as u64).to_be_bytes());
    p.extend_from_slice(&0i64.to_be_bytes());
    p.extend_from_slice(data);
    frame(b'd', &p)
}

fn keepalive(end: u64, reply: bool) -> Vec<u8> {
    let mut p = vec![b'k'];
    p.extend_from_slice(&end.to_be_bytes());
    p.extend_from_slice(&0i64.to_be_bytes());
    p.push(reply as u8);
    frame(b'd', &p)
}

/// Reads one frontend message (tag, body); the startup message has no tag.
fn read_msg(s: &mut UnixStream, tagged: bool) -> (u8, Vec<u8>) {
    let mut tag = [0u8; 1];
    if tagged {
        s.read_exact(&mut tag).unwrap();
    }
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    s.read_exact(&mut body).unwrap();
    (tag[0], body)
}

/// Sends `bytes` one byte at a time with pauses, so every frame is cut across reads and
/// some reads time out half-way through a frame.
fn dribble(s: &mut UnixStream, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        s.write_all(&[*b]).unwrap();
        if i % 16 == 0 {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A fake server on a socket in a temp dir; `script` runs on the accepted connection
/// after the startup (which it checks) and answers AuthenticationOk.
fn fake_server(
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, ReplConfig, thread::JoinHandle<()>) {
    fake_server_auth(|_| {}, script)
}

/// Same, with `auth` run before AuthenticationOk.
fn fake_server_auth(
    auth: impl FnOnce(&mut UnixStream) + Send + 'static,
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, ReplConfig, thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let l = UnixListener::bind(dir.path().join(".s.PGSQL.5999")).unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let (_, startup) = read_msg(&mut s, false);
        let text = String::from_utf8_lossy(&startup[4..]).into_owned();
        let kv: Vec<&str> = text.split('\0').collect();
        assert!(
            kv.windows(2).any(|w| w == ["replication", "true"]),
            "{kv:?}"
        );
        assert!(
            kv.windows(2).any(|w| w == ["application_name", "test_app"]),
            "{kv:?}"
        );
        auth(&mut s);
        let mut out = frame(b'R', &0i32.to_be_bytes());
        out.extend(frame(
            b'S',
            &[cstr("server_version"), cstr("15.4")].concat(),
        ));
        out.extend(ready());
        // A client that gave up during authentication has closed the socket.
        if s.write_all(&out).is_err() {
            return;
        }
        script(&mut s);
    });
    let mut cfg = ReplConfig::new(dir.path().to_str().unwrap(), 5999, "postgres");
    cfg.application_name = "test_app".into();
    (dir, cfg, h)
}

#[test]
fn streaming_exchange_against_a_scripted_server() {
    let wal: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let wal2 = wal.clone();
    let (_d, cfg, h) = fake_server(move |s| {
        let (t, q) = read_msg(s, true);
        assert_eq!(t, b'Q');
        assert_eq!(
            q,
            cstr("START_REPLICATION SLOT s1 PHYSICAL 0/3000000 TIMELINE 1")
        );
        let mut out = frame(b'W', &[0, 0, 0]);
        out.extend(xlogdata(0x300_0000, &wal2[..1000]));
        out.extend(xlogdata(0x300_0000 + 1000, &wal2[1000..]));
        out.extend(keepalive(0x300_0000 + 3000, true));
        dribble(s, &out);
        // The first status update goes out at once, the keepalive's reply after it.
        let mut flushes = Vec::new();
        while flushes.len() < 2 {
            let (t, b) = read_msg(s, true);
            assert_eq!(t, b'd');
            assert_eq!(b[0], b'r');
            assert_eq!(b.len(), 34);
            flushes.push(u64::from_be_bytes(b[9..17].try_into().unwrap()));
        }
        assert_eq!(
            flushes[1],
            0x300_0000 + 3000,
            "reply carries the reported flush"
        );
        s.write_all(&frame(b'c', &[])).unwrap();
        // After the client's CopyDone: the next-timeline row.
        loop {
            let (t, _) = read_msg(s, true);
            if t == b'c' {
                break;
            }
        }
        let mut out = row_desc(&["next_tli", "next_tli_startpos"]);
        out.extend(data_row(&[Some(b"2"), Some(b"0/3000BB8")]));
        out.extend(complete("START_STREAMING"));
        out.extend(complete("START_REPLICATION"));
        out.extend(ready());
        dribble(s, &out);
        let (t, q) = read_msg(s, true);
        assert_eq!((t, q), (b'Q', cstr("IDENTIFY_SYSTEM")));
        let mut out = row_desc(&["systemid", "timeline", "xlogpos", "dbname"]);
        out.extend(data_row(&[
            Some(b"7300000000000000001"),
            Some(b"2"),
            Some(b"0/3001000"),
            None,
        ]));
        out.extend(complete("IDENTIFY_SYSTEM"));
        out.extend(ready());
        s.write_all(&out).unwrap();
        let (t, _) = read_msg(s, true);
        assert_eq!(t, b'X', "terminate on drop");
    });
    let mut conn = ReplConnection::connect(&cfg).unwrap();
    assert_eq!(conn.server_major(), 15);
    let mut got = Vec::new();
    {
        let mut st = conn
            .start_replication(Some("s1"), Lsn(0x300_0000), 1)
            .unwrap();
        let end = loop {
            match st.next_event(Duration::from_millis(20)).unwrap() {
                Event::Data { start, bytes, .. } => {
                    assert_eq!(start.0, 0x300_0000 + got.len() as u64);
                    got.extend_from_slice(&bytes);
                    st.report_flushed(st.received()).unwrap();
                }
                Event::Keepalive {
                    reply_requested, ..
                } => assert!(reply_requested),
                Event::Timeout => {}
                e @ Event::EndOfTimeline { .. } => break e,
                e => panic!("{e:?}"),
            }
        };
        assert_eq!(
            end,
            Event::EndOfTimeline {
                next_tli: 2,
                switchpoint: Lsn(0x300_0BB8)
            }
        );
        // Flushing beyond what arrived is refused.
        assert!(st.report_flushed(Lsn(0x400_0000)).is_err());
    }
    assert_eq!(got, wal);
    let id = conn.identify_system().unwrap();
    assert_eq!(id.system_id, 7300000000000000001);
    assert_eq!(id.timeline, 2);
    assert_eq!(id.xlogpos, Lsn(0x300_1000));
    assert_eq!(id.dbname, None);
    drop(conn);
    h.join().unwrap();
}

#[test]
fn switch_point_start_answers_without_copy_both() {
    let (_d, cfg, h) = fake_server(|s| {
        read_msg(s, true);
        let mut out = row_desc(&["next_tli", "next_tli_startpos"]);
        out.extend(data_row(&[Some(b"3"), Some(b"0/5000028")]));
        out.extend(complete("START_STREAMING"));
        out.extend(ready());
        s.write_all(&out).unwrap();
        read_msg(s, true);
    });
    let mut conn = ReplConnection::connect(&cfg).unwrap();
    let mut st = conn.start_replication(None, Lsn(0x500_0028), 2).unwrap();
    assert_eq!(
        st.next_event(Duration::from_secs(5)).unwrap(),
        Event::EndOfTimeline {
            next_tli: 3,
            switchpoint: Lsn(0x500_0028)
        }
    );
    assert!(st.next_event(Duration::from_secs(1)).is_err(), "ended");
    drop(st);
    drop(conn);
    h.join().unwrap();
}

#[test]
fn server_errors_name_the_server_and_the_fields() {
    let (_d, cfg, h) = fake_server(|s| {
        read_msg(s, true);
        let mut out = error("58P01", "could not open file \"pg_wal/00000001.history\"");
        out.extend(ready());
        s.write_all(&out).unwrap();
        read_msg(s, true);
        let mut out = frame(b'W', &[0, 0, 0]);
        out.extend(xlogdata(0x100, b"ab"));
        out.extend(xlogdata(0x200, b"cd"));
        s.write_all(&out).unwrap();
        let _ = read_msg(s, true);
    });
    let mut conn = ReplConnection::connect(&cfg).unwrap();
    let e = conn.timeline_history(1).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::NotFound);
    let m = e.message();
    assert!(
        m.contains("58P01") && m.contains("ERROR") && m.contains(".s.PGSQL.5999"),
        "{m}"
    );
    // Data that does not follow on is a protocol error, and breaks the connection.
    {
        let mut st = conn.start_replication(None, Lsn(0x100), 1).unwrap();
        assert!(matches!(
            st.next_event(Duration::from_secs(5)).unwrap(),
            Event::Data { .. }
        ));
        let e = st.next_event(Duration::from_secs(5)).unwrap_err();
        assert!(e.message().contains("expected 0/102"), "{e}");
    }
    assert!(conn.identify_system().is_err());
    drop(conn);
    h.join().unwrap();
}

#[test]
fn md5_and_cleartext_passwords_are_answered() {
    let (_d, mut cfg, h) = fake_server_auth(
        |s| {
            let mut m = 5i32.to_be_bytes().to_vec();
            m.extend_from_slice(&[1, 2, 3, 4]);
            s.write_all(&frame(b'R', &m)).unwrap();
            let (t, b) = read_msg(s, true);
            assert_eq!(t, b'p');
            let want =
                postgres_protocol::authentication::md5_hash(b"postgres", b"s3cret", [1, 2, 3, 4]);
            assert_eq!(b, cstr(&want));
            s.write_all(&frame(b'R', &3i32.to_be_bytes())).unwrap();
            let (t, b) = read_msg(s, true);
            assert_eq!((t, b), (b'p', cstr("s3cret")));
        },
        |s| {
            read_msg(s, true);
        },
    );
    cfg.password = Some("s3cret".into());
    let conn = ReplConnection::connect(&cfg).unwrap();
    drop(conn);
    h.join().unwrap();
}

#[test]
fn a_password_request_without_a_password_is_a_clear_error() {
    let (_d, mut cfg, h) = fake_server_auth(
        |s| {
            s.write_all(&frame(b'R', &3i32.to_be_bytes())).unwrap();
        },
        |_| {},
    );
    cfg.password = None;
    let e = ReplConnection::connect(&cfg).err().unwrap();
    assert!(
        e.message().contains("password authentication") && e.message().contains("PGPASSWORD"),
        "{e}"
    );
    h.join().unwrap();
}

#[test]
fn an_absurd_message_length_is_refused_before_allocating() {
    let (_d, cfg, h) = fake_server(|s| {
        read_msg(s, true);
        let mut out = vec![b'D'];
        out.extend_from_slice(&0x7fff_0000i32.to_be_bytes());
        s.write_all(&out).unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    let mut conn = ReplConnection::connect(&cfg).unwrap();
    let e = conn.identify_system().unwrap_err();
    assert!(e.message().contains("exceeds"), "{e}");
    assert!(
        conn.identify_system().is_err(),
        "the connection is broken after it"
    );
    drop(conn);
    h.join().unwrap();
}
