//! A blocking replication connection: sockets, startup with `replication=true`,
//! authentication, framing and the simple-query exchange (commands: `commands.rs`).
//!
//! Frames are read into one buffer and cut with `postgres-protocol`'s `Header`; the
//! CopyBothResponse (`'W'`), which `Message::parse` rejects, is recognised here first.
//! Reads honour a deadline through the socket's read timeout, and a partial frame simply
//! stays in the buffer, so a timeout never desynchronises the protocol.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postgres::fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{self, ErrorFields, Message};
use postgres_protocol::message::frontend;

use super::msg;
use crate::error::{Error, ErrorKind, Result};
use crate::server::ConnParams;

/// The largest backend message accepted (XLogData is at most 128 kB; a history file or an
/// error text is far below this): a corrupt length must not make us allocate gigabytes.
const MAX_MESSAGE: usize = 64 << 20;

/// How long a write to the server may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a command's answer may take (commands are quick; `DROP ... WAIT` may wait for
/// a slot's user, which the caller asked for).
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Where and as whom to connect. A `host` starting with `/` is a socket directory
/// (`<host>/.s.PGSQL.<port>`), as in libpq. Its `Debug` output hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Used only when the server asks for a password.
    pub password: Option<String>,
    /// Shown in `pg_stat_replication`; `synchronous_standby_names` matches it.
    pub application_name: String,
    /// Bounds connecting and the whole startup/authentication exchange.
    pub connect_timeout: Duration,
}

impl ReplConfig {
    /// Settings for `user` at `host`/`port`; the password comes from `PGPASSWORD`.
    pub fn new(host: &str, port: u16, user: &str) -> ReplConfig {
        ReplConfig {
            host: host.to_string(),
            port,
            user: user.to_string(),
            password: env("PGPASSWORD"),
            application_name: "walnut".to_string(),
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// Settings from library connection parameters, unset ones from PGHOST, PGPORT and
    /// PGUSER, then libpq's defaults (socket directory `/var/run/postgresql`, 5432,
    /// `postgres`). `dbname` plays no part: a physical replication connection has none.
    pub fn from_params(p: &ConnParams) -> ReplConfig {
        let host = p
            .host
            .clone()
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| "/var/run/postgresql".to_string());
        let port = p
            .port
            .or_else(|| env("PGPORT").and_then(|s| s.parse().ok()))
            .unwrap_or(5432);
        let user = p
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .unwrap_or_else(|| "postgres".to_string());
        ReplConfig::new(&host, port, &user)
    }

    /// `host "H" port P` (or the socket path), for messages.
    pub fn endpoint(&self) -> String {
        if self.host.starts_with('/') {
            format!(
                "socket \"{}\"",
                self.socket_path().as_os_str().to_string_lossy()
            )
        } else {
            format!("host \"{}\" port {}", self.host, self.port)
        }
    }

    fn socket_path(&self) -> PathBuf {
        PathBuf::from(&self.host).join(format!(".s.PGSQL.{}", self.port))
    }
}

impl std::fmt::Debug for ReplConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "********"))
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Sock {
    /// Receives up to `max` bytes into `buf`'s spare capacity (reserved by the caller)
    /// and extends `buf` by what arrived: no zero-filling of the space first (for a
    /// stream of WAL that was a memset as large as the WAL itself).
    fn recv_into(&mut self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        };
        let spare = buf.spare_capacity_mut();
        let len = spare.len().min(max);
        // SAFETY: `spare` is allocated memory owned by `buf`, at least `len` bytes long;
        // recv writes at most `len` bytes there through the raw pointer (no reference to
        // the uninitialised bytes is made).
        let n = unsafe { nix::libc::recv(fd, spare.as_mut_ptr().cast(), len, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        // SAFETY: the first `n` bytes of the spare capacity were written by recv just now
        // (n <= len <= the spare capacity).
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.flush(),
            Sock::Unix(s) => s.flush(),
        }
    }
}

/// One backend message, with the CopyBothResponse that `postgres-protocol` lacks.
pub(crate) enum Frame {
    CopyBoth,
    Msg(Message),
}

/// An ErrorResponse's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> ServerError {
        let mut e = ServerError::default();
        while let Ok(Some(f)) = fields.next() {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                // 'V' is the untranslated severity (9.6+); 'S' the localised one.
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        e
    }

    /// The crate error: `server at ENDPOINT: SEVERITY CODE: message (detail) (hint)`.
    /// "Does not exist" (`58P01`, `42704`) is `NotFound`, the rest `Server`.
    pub fn into_error(self, endpoint: &str, during: &str) -> Error {
        let mut msg = format!(
            "{during}: server at {endpoint}: {} {}: {}",
            self.severity, self.code, self.message
        );
        if let Some(d) = &self.detail {
            msg.push_str(&format!(" (detail: {d})"));
        }
        if let Some(h) = &self.hint {
            msg.push_str(&format!(" (hint: {h})"));
        }
        let kind = match self.code.as_str() {
            "58P01" | "42704" => ErrorKind::NotFound,
            _ => ErrorKind::Server,
        };
        Error::new(kind, msg)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    Ready,
    Streaming,
    /// A protocol or I/O failure left the stream at an unknown point.
    Broken,
}

/// One result set of a simple query: column names and rows of raw text values.
#[derive(Clone, Debug, Default)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<Bytes>>>,
    pub tag: String,
}

/// A blocking connection to a walsender.
pub struct ReplConnection {
    sock: Sock,
    rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) endpoint: String,
    read_timeout: Option<Duration>,
    params: HashMap<String, String>,
    pub(super) server_major: u32,
    pub(crate) state: ConnState,
}

/// The major version from `server_version` ("15.18 (Debian ...)", "18.6", "9.6.24").
fn parse_major(v: &str) -> Option<u32> {
    let mut it = v.split(|c: char| !c.is_ascii_digit());
    let first: u32 = it.next()?.parse().ok()?;
    if first >= 10 {
        Some(first)
    } else {
        // 9.x: the major is "9.x"; walnut never streams from those, call it 9.
        Some(first)
    }
}

impl ReplConnection {
    /// Connects, starts a physical replication session and authenticates.
    pub fn connect(cfg: &ReplConfig) -> Result<ReplConnection> {
        let endpoint = cfg.endpoint();
        let deadline = Instant::now() + cfg.connect_timeout;
        let sock = open_socket(cfg).map_err(|e| {
            Error::server(format!(
                "could not connect to server at {endpoint} as user \"{}\": {e}",
                cfg.user
            ))
        })?;
        let _ = sock.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut c = ReplConnection {
            sock,
            rbuf: BytesMut::with_capacity(256 << 10),
            wbuf: BytesMut::with_capacity(1024),
            endpoint,
            read_timeout: None,
            params: HashMap::new(),
            server_major: 0,
            state: ConnState::Ready,
        };
        c.startup(cfg, deadline).map_err(|e| {
            let ctx = format!(
                "replication connection to {} as user \"{}\"",
                c.endpoint, cfg.user
            );
            if e.message().contains(&c.endpoint) {
                e
            } else {
                e.context(ctx)
            }
        })?;
        Ok(c)
    }

    fn startup(&mut self, cfg: &ReplConfig, deadline: Instant) -> Result<()> {
        let params = [
            ("user", cfg.user.as_str()),
            ("replication", "true"),
            ("application_name", cfg.application_name.as_str()),
        ];
        frontend::startup_message(params, &mut self.wbuf)
            .map_err(|e| Error::invalid(format!("startup message: {e}")))?;
        self.flush_wbuf()?;
        let during = format!("authenticating as user \"{}\"", cfg.user);
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = match self.read_message(Some(deadline))? {
                Some(m) => m,
                None => {
                    return Err(Error::server(format!(
                        "server at {} did not complete the startup within {} s",
                        self.endpoint,
                        cfg.connect_timeout.as_secs()
                    )))
                }
            };
            match m {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(cfg, "password")?;
                    self.send_password(pw.as_bytes())?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(cfg, "md5")?;
                    let hash = md5_hash(cfg.user.as_bytes(), pw.as_bytes(), body.salt());
                    self.send_password(hash.as_bytes())?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechs.next().map_err(|e| self.proto(e))? {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(Error::server(format!(
                            "server at {} offers no SASL mechanism walnut supports \
                             (SCRAM-SHA-256 without channel binding)",
                            self.endpoint
                        )));
                    }
                    let pw = self.password(cfg, "scram-sha-256")?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)
                        .map_err(|e| self.proto(e))?;
                    self.flush_wbuf()?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.unexpected("SASL continue"))?;
                    s.update(body.data()).map_err(|e| self.auth_failed(e))?;
                    let out = s.message().to_vec();
                    frontend::sasl_response(&out, &mut self.wbuf).map_err(|e| self.proto(e))?;
                    self.flush_wbuf()?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.unexpected("SASL final"))?;
                    // Verifies the server's signature: a server that does not know the
                    // password cannot pretend to.
                    s.finish(body.data()).map_err(|e| self.auth_failed(e))?;
                }
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGssContinue(_) => {
                    return Err(Error::server(format!(
                        "server at {} requests an authentication method walnut does not \
                         support (only trust, password, md5 and scram-sha-256)",
                        self.endpoint
                    )))
                }
                Message::BackendKeyData(_) => {}
                Message::ParameterStatus(p) => self.remember_param(&p),
                Message::NoticeResponse(n) => self.log_notice(n.fields()),
                Message::ErrorResponse(e) => {
                    return Err(
                        ServerError::from_fields(e.fields()).into_error(&self.endpoint, &during)
                    )
                }
                Message::ReadyForQuery(_) => break,
                _ => return Err(self.unexpected("startup")),
            }
        }
        let v = self
            .params
            .get("server_version")
            .cloned()
            .unwrap_or_default();
        self.server_major = parse_major(&v).unwrap_or(0);
        log::debug!(
            "replication connection to {} (server {v}) ready",
            self.endpoint
        );
        Ok(())
    }

    fn password(&self, cfg: &ReplConfig, method: &str) -> Result<String> {
        cfg.password.clone().ok_or_else(|| {
            Error::server(format!(
                "server at {} requests {method} authentication for user \"{}\" but no \
                 password was given (set PGPASSWORD)",
                self.endpoint, cfg.user
            ))
        })
    }

    fn send_password(&mut self, pw: &[u8]) -> Result<()> {
        frontend::password_message(pw, &mut self.wbuf).map_err(|e| self.proto(e))?;
        self.flush_wbuf()
    }

    fn auth_failed(&self, e: io::Error) -> Error {
        Error::server(format!(
            "SCRAM authentication with server at {} failed: {e}",
            self.endpoint
        ))
    }

    pub(super) fn remember_param(&mut self, p: &backend::ParameterStatusBody) {
        if let (Ok(k), Ok(v)) = (p.name(), p.value()) {
            self.params.insert(k.to_string(), v.to_string());
        }
    }

    pub(super) fn log_notice(&self, fields: ErrorFields<'_>) {
        let n = ServerError::from_fields(fields);
        log::info!(
            "server at {}: {} {}: {}",
            self.endpoint,
            n.severity,
            n.code,
            n.message
        );
    }

    /// The server's major version (from its `server_version` parameter; 0 if unknown).
    pub fn server_major(&self) -> u32 {
        self.server_major
    }

    /// A parameter the server reported at startup (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(|s| s.as_str())
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub(crate) fn proto(&self, e: impl std::fmt::Display) -> Error {
        Error::server(format!(
            "protocol error on the connection to {}: {e}",
            self.endpoint
        ))
    }

    pub(crate) fn unexpected(&self, during: &str) -> Error {
        Error::server(format!(
            "unexpected message from server at {} during {during}",
            self.endpoint
        ))
    }

    /// Sends what is in the write buffer.
    pub(crate) fn flush_wbuf(&mut self) -> Result<()> {
        let r = self
            .sock
            .write_all(&self.wbuf)
            .and_then(|_| self.sock.flush());
        self.wbuf.clear();
        r.map_err(|e| {
            self.state = ConnState::Broken;
            Error::server(format!(
                "could not send to server at {}: {e}",
                self.endpoint
            ))
        })
    }

    pub(crate) fn wbuf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Reads more bytes, waiting at most until `deadline`; false when it passed first.
    fn fill(&mut self, deadline: Option<Instant>) -> Result<bool> {
        let timeout = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                Some(left)
            }
            None => None,
        };
        if timeout != self.read_timeout {
            self.sock.set_read_timeout(timeout).map_err(|e| {
                Error::server(format!("socket to {}: set timeout: {e}", self.endpoint))
            })?;
            self.read_timeout = timeout;
        }
        const CHUNK: usize = 128 << 10;
        self.rbuf.reserve(CHUNK);
        loop {
            match self.sock.recv_into(&mut self.rbuf, CHUNK) {
                Ok(0) => {
                    self.state = ConnState::Broken;
                    return Err(Error::server(format!(
                        "server at {} closed the connection unexpectedly",
                        self.endpoint
                    )));
                }
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Ok(false);
                }
                Err(e) => {
                    self.state = ConnState::Broken;
                    return Err(Error::server(format!(
                        "could not receive from server at {}: {e}",
                        self.endpoint
                    )));
                }
            }
        }
    }

    /// Cuts one whole frame off the read buffer, if one is there.
    fn try_frame(&mut self) -> Result<Option<Frame>> {
        let Some(h) = backend::Header::parse(&self.rbuf).map_err(|e| self.proto(e))? else {
            return Ok(None);
        };
        let total = h.len() as usize + 1;
        if total > MAX_MESSAGE {
            self.state = ConnState::Broken;
            return Err(self.proto(format!(
                "message of {total} bytes (tag {:?}) exceeds the {MAX_MESSAGE}-byte limit",
                h.tag() as char
            )));
        }
        if self.rbuf.len() < total {
            return Ok(None);
        }
        if h.tag() == b'W' {
            let f = self.rbuf.split_to(total);
            msg::check_copy_both(&f[5..])?;
            return Ok(Some(Frame::CopyBoth));
        }
        match Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Frame::Msg(m))),
            Ok(None) => Err(self.proto("incomplete message after a complete header")),
            Err(e) => {
                self.state = ConnState::Broken;
                Err(self.proto(e))
            }
        }
    }

    /// The next frame, or `None` when `deadline` passed first.
    pub(crate) fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            if !self.fill(deadline)? {
                return Ok(None);
            }
        }
    }

    pub(super) fn read_message(&mut self, deadline: Option<Instant>) -> Result<Option<Message>> {
        match self.read_frame(deadline)? {
            Some(Frame::Msg(m)) => Ok(Some(m)),
            Some(Frame::CopyBoth) => Err(self.unexpected("a command (CopyBothResponse)")),
            None => Ok(None),
        }
    }

    pub(super) fn check_ready(&self) -> Result<()> {
        match self.state {
            ConnState::Ready => Ok(()),
            ConnState::Streaming => Err(Error::invalid(format!(
                "replication connection to {} is streaming; end the stream first",
                self.endpoint
            ))),
            ConnState::Broken => Err(Error::server(format!(
                "replication connection to {} is broken after an earlier error",
                self.endpoint
            ))),
        }
    }

    /// Runs one replication command and returns its result sets.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>> {
        self.check_ready()?;
        frontend::query(sql, &mut self.wbuf).map_err(|e| Error::invalid(format!("{sql}: {e}")))?;
        self.flush_wbuf()?;
        self.read_results(sql, None)
    }

    /// Reads result sets until ReadyForQuery. `first` is a message already read.
    pub(crate) fn read_results(
        &mut self,
        sql: &str,
        first: Option<Message>,
    ) -> Result<Vec<QueryResult>> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut out: Vec<QueryResult> = Vec::new();
        let mut cur: Option<QueryResult> = None;
        let mut err: Option<ServerError> = None;
        let mut pending = first;
        loop {
            let m = match pending.take() {
                Some(m) => m,
                None => match self.read_frame(Some(deadline))? {
                    Some(Frame::Msg(m)) => m,
                    Some(Frame::CopyBoth) => {
                        self.state = ConnState::Broken;
                        return Err(self.unexpected(&format!("\"{sql}\" (CopyBothResponse)")));
                    }
                    None => {
                        self.state = ConnState::Broken;
                        return Err(Error::server(format!(
                            "server at {} did not answer \"{sql}\" within {} s",
                            self.endpoint,
                            COMMAND_TIMEOUT.as_secs()
                        )));
                    }
                },
            };
            match m {
                Message::RowDescription(rd) => {
                    let mut cols = Vec::new();
                    let mut fields = rd.fields();
                    while let Some(f) = fields.next().map_err(|e| self.proto(e))? {
                        cols.push(f.name().to_string());
                    }
                    if let Some(c) = cur.take() {
                        out.push(c);
                    }
                    cur = Some(QueryResult {
                        columns: cols,
                        ..QueryResult::default()
                    });
                }
                Message::DataRow(row) => {
                    let buf = row.buffer_bytes().clone();
                    let mut vals = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(r) = ranges.next().map_err(|e| self.proto(e))? {
                        vals.push(r.map(|r| buf.slice(r)));
                    }
                    match cur.as_mut() {
                        Some(c) => c.rows.push(vals),
                        None => return Err(self.unexpected("a row without a description")),
                    }
                }
                Message::CommandComplete(c) => {
                    let tag = c.tag().map_err(|e| self.proto(e))?.to_string();
                    match cur.take() {
                        Some(mut r) => {
                            r.tag = tag;
                            out.push(r);
                        }
                        None => out.push(QueryResult {
                            tag,
                            ..QueryResult::default()
                        }),
                    }
                }
                Message::EmptyQueryResponse => {}
                Message::ErrorResponse(e) => err = Some(ServerError::from_fields(e.fields())),
                Message::NoticeResponse(n) => self.log_notice(n.fields()),
                Message::ParameterStatus(p) => self.remember_param(&p),
                Message::ReadyForQuery(_) => break,
                _ => {
                    self.state = ConnState::Broken;
                    return Err(self.unexpected(&format!("\"{sql}\"")));
                }
            }
        }
        if let Some(c) = cur.take() {
            out.push(c);
        }
        self.state = ConnState::Ready;
        match err {
            Some(e) => Err(e.into_error(&self.endpoint, sql)),
            None => Ok(out),
        }
    }
}

impl Drop for ReplConnection {
    fn drop(&mut self) {
        // A polite goodbye; the server copes with a plain close too.
        if self.state != ConnState::Broken {
            self.wbuf.clear();
            frontend::terminate(&mut self.wbuf);
            let _ = self.sock.write_all(&self.wbuf);
        }
    }
}

fn open_socket(cfg: &ReplConfig) -> io::Result<Sock> {
    if cfg.host.starts_with('/') {
        return UnixStream::connect(cfg.socket_path()).map(Sock::Unix);
    }
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address");
    for addr in (cfg.host.as_str(), cfg.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, cfg.connect_timeout) {
            Ok(s) => {
                // Status updates are tiny and latency matters for synchronous replication.
                s.set_nodelay(true)?;
                return Ok(Sock::Tcp(s));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(parse_major("15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(parse_major("18.6"), Some(18));
        assert_eq!(parse_major("19devel"), Some(19));
        assert_eq!(parse_major(""), None);
    }

    #[test]
    fn endpoints() {
        let c = ReplConfig::new("/tmp/sock", 5433, "u");
        assert_eq!(c.endpoint(), "socket \"/tmp/sock/.s.PGSQL.5433\"");
        let mut c = ReplConfig::new("127.0.0.1", 5433, "u");
        assert_eq!(c.endpoint(), "host \"127.0.0.1\" port 5433");
        c.password = Some("hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
