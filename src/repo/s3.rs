//! [`S3Repo`]: a catalog in an S3-compatible bucket, one object per key under a prefix.
//!
//! Requests are signed by `rusty-s3` (sans-IO SigV4, presigned URLs) and sent by `ureq`
//! (blocking, pooled connections): walnut stays synchronous and small.
//!
//! What walnut assumes, and how each rule of [`super::Repo`] holds:
//! - **Create-only.** When `walnut init` found that the server honours `If-None-Match: *`
//!   on PUT (recorded in `walnut-s3.json`), every create sends it and a 412 is
//!   [`ErrorKind::Conflict`]. Servers that ignore it (Garage 2.5) get a HEAD before the PUT
//!   instead, which is safe under walnut's own rules, not the server's: one writer per
//!   instance (the archiver of one primary, a backup under the instance's lock), names
//!   that are unique and never reused (segments, backup ids, content-named objects), and
//!   the duplicate check of `archive_command` compares content ([`super::put_or_same`]).
//! - **Nothing visible incomplete.** A PUT is atomic on S3; a large object is a multipart
//!   upload that appears only on `CompleteMultipartUpload`, and one that fails is aborted.
//! - **Integrity.** Every PUT carries `x-amz-checksum-crc32c`, every part `Content-MD5`,
//!   both verified by the server. Downloads check the length, and the CRC-32C the server
//!   returns for single-PUT objects; callers check the content's own CRCs as on disk.
//! - **Faults.** Timeouts, connection failures, 5xx and 429 are retried with jittered
//!   back-off until the operation's deadline (`--s3-timeout`), then are
//!   [`ErrorKind::Io`] (unavailable). 404 is [`ErrorKind::NotFound`] only for a missing
//!   key (`NoSuchKey`, or a HEAD); a missing bucket is [`ErrorKind::Invalid`]. 401/403 are
//!   [`ErrorKind::Refused`], other 4xx [`ErrorKind::Invalid`]. Messages name the endpoint,
//!   bucket and key, never the credentials.
//! - **Locks** are leases in the bucket (see [`lease`]): per-holder lease objects with an
//!   expiry on the server's clock, renewed while held, taken over once expired; with a
//!   local `flock` (see [`S3Config::lock_dir`]) taken first for takers on one host.
//! - **Durability.** A PUT that succeeded is durable: [`Repo::barrier`] has nothing to do.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::{Deserialize, Serialize};

use super::{
    check_key, check_prefix, Blob, Durability, Listing, LockMode, ObjectInfo, ObjectWriter, Repo,
    RepoLock,
};
use crate::error::{Error, ErrorKind, IoContext, Result};

mod lease;
mod net;
pub use lease::{DEFAULT_LEASE, LEASE_ENV};

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// The size of one part (S3's minimum is 5 MiB except for the last).
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once per object; with the queue, memory stays at a few parts.
const PART_THREADS: usize = 3;
/// How long a presigned URL is valid: one attempt's lifetime, comfortably.
const SIGN_FOR: Duration = Duration::from_secs(3600);
/// Ranged reads shorter than this go through read-ahead windows.
const SMALL_READ: u64 = 64 << 10;
/// The alignment and size of a read-ahead window.
const WINDOW: u64 = 1 << 20;
/// The bytes of windows kept per process.
const WINDOW_CACHE: usize = 32 << 20;
/// How long aborting a failed multipart upload may retry.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The object `walnut init` records the probe's result in.
pub const S3_CONFIG_KEY: &str = "walnut-s3.json";

/// How to reach a bucket: the library's plain settings (the cli builds them).
#[derive(Clone)]
pub struct S3Config {
    /// `https://host[:port]` (or `http://` when the user says so).
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`) rather than virtual-host ones.
    pub path_style: bool,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// PEM file of the CA certificates to trust instead of the bundled roots.
    pub ca_file: Option<PathBuf>,
    /// How long one operation may keep retrying.
    pub timeout: Duration,
    /// Local directory for lock files (per host; see the module docs).
    pub lock_dir: PathBuf,
    /// How long a lock's lease lives without renewal (see [`lease`]).
    pub lease: Duration,
    /// Where the credentials were read from, when a file (for restore_command).
    pub credentials_file: Option<PathBuf>,
    /// The config file used, if any (for restore_command).
    pub config_file: Option<PathBuf>,
}

impl std::fmt::Debug for S3Config {
    // Never the secret, nor the session token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("path_style", &self.path_style)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// What `walnut init` found out about the server (`walnut-s3.json`, create-only).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct S3Probe {
    pub format: u64,
    /// Whether a PUT with `If-None-Match: *` on an existing key was refused (412).
    pub conditional_create: bool,
}

#[derive(Debug)]
struct Inner {
    cfg: S3Config,
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    /// Send `If-None-Match: *` on creates (else HEAD first).
    conditional: AtomicBool,
    /// Read-ahead windows of small ranged reads (see [`S3Repo::get_range`]).
    windows: Mutex<Windows>,
}

/// Recently fetched windows of objects, oldest first, at most [`WINDOW_CACHE`] bytes.
/// Objects are never rewritten, so a window stays true for the life of the process.
#[derive(Debug, Default)]
struct Windows {
    list: std::collections::VecDeque<(String, u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

impl Windows {
    fn find(&self, key: &str, off: u64, len: u64) -> Option<Vec<u8>> {
        self.list.iter().rev().find_map(|(k, start, data)| {
            let end = start + data.len() as u64;
            (k == key && off >= *start && off + len <= end).then(|| {
                let s = (off - start) as usize;
                data[s..s + len as usize].to_vec()
            })
        })
    }

    fn add(&mut self, key: &str, start: u64, data: Arc<Vec<u8>>) {
        self.bytes += data.len();
        self.list.push_back((key.to_string(), start, data));
        while self.bytes > WINDOW_CACHE {
            match self.list.pop_front() {
                Some((_, _, d)) => self.bytes -= d.len(),
                None => break,
            }
        }
    }
}

/// A catalog in a bucket (see the module docs).
#[derive(Debug, Clone)]
pub struct S3Repo {
    inner: Arc<Inner>,
}

/// One request, rebuilt (re-signed) for every attempt.
struct Req<'a> {
    method: &'static str,
    url: url::Url,
    headers: Vec<(&'static str, String)>,
    body: &'a [u8],
}

type Resp = ureq::http::Response<ureq::Body>;

impl S3Repo {
    /// A repository over `cfg` (no request is made).
    pub fn new(cfg: S3Config) -> Result<S3Repo> {
        let endpoint: url::Url = cfg.endpoint.parse().map_err(|e| {
            Error::invalid(format!("S3 endpoint \"{}\": not a URL ({e})", cfg.endpoint))
        })?;
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket =
            Bucket::new(endpoint, style, cfg.bucket.clone(), cfg.region.clone()).map_err(|e| {
                Error::invalid(format!(
                    "S3 endpoint \"{}\", bucket \"{}\": {e:?} (an IP address or a bucket name \
                     with dots needs --s3-uri-style path)",
                    cfg.endpoint, cfg.bucket
                ))
            })?;
        let creds = match &cfg.session_token {
            Some(t) => Credentials::new_with_token(&cfg.access_key, &cfg.secret_key, t),
            None => Credentials::new(&cfg.access_key, &cfg.secret_key),
        };
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &cfg.ca_file {
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&read_ca_file(ca)?));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(false)
            .max_redirects(0)
            .tls_config(tls.build())
            .timeout_connect(Some(Duration::from_secs(10)))
            .max_idle_connections_per_host(16)
            .user_agent(concat!("walnut/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(config, net::connector(), net::Resolve::default());
        Ok(S3Repo {
            inner: Arc::new(Inner {
                cfg,
                bucket,
                creds,
                agent,
                conditional: AtomicBool::new(false),
                windows: Mutex::new(Windows::default()),
            }),
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.inner.cfg
    }

    /// Uses `If-None-Match: *` for creates (what [`S3Repo::probe_conditional`] found).
    pub fn set_conditional(&self, on: bool) {
        self.inner.conditional.store(on, Ordering::Relaxed);
    }

    pub fn conditional(&self) -> bool {
        self.inner.conditional.load(Ordering::Relaxed)
    }

    /// Asks the server whether it refuses a second `If-None-Match: *` PUT of one key (412),
    /// with a probe object under the prefix that is deleted afterwards (when allowed).
    pub fn probe_conditional(&self) -> Result<bool> {
        let nonce = RandomState::new().build_hasher().finish();
        let key = format!(".walnut-probe-{}-{nonce:016x}", std::process::id());
        let i = &self.inner;
        let put = || i.put_once(&key, b"probe", true);
        let first = put()?;
        if !first {
            return Err(Error::conflict(format!(
                "{}: probe object {key} exists already",
                i.describe(&key)
            )));
        }
        let honoured = !put()?;
        if let Err(e) = i.delete_full(&i.full(&key)) {
            log::warn!("could not remove the probe object: {e}");
        }
        Ok(honoured)
    }
}

fn read_ca_file(p: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let pem = fs::read(p).ctx("read CA file", p)?;
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(Error::invalid(format!("CA file \"{}\": {e}", p.display()))),
        }
    }
    if out.is_empty() {
        return Err(Error::invalid(format!(
            "CA file \"{}\" holds no PEM certificate",
            p.display()
        )));
    }
    Ok(out)
}

/// A random-ish fraction in [0, 1) for back-off jitter (std's per-process random keys).
fn jitter() -> f64 {
    (RandomState::new().build_hasher().finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Jittered exponential back-off, for request retries and for lease contention alike:
/// each pause is half to all of the current delay, which then doubles up to `max`.
struct Backoff {
    delay: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { delay: first, max }
    }

    /// Sleeps for the next pause, at most `cap`.
    fn pause(&mut self, cap: Duration) {
        std::thread::sleep(self.delay.mul_f64(0.5 + jitter() / 2.0).min(cap));
        self.delay = (self.delay * 2).min(self.max);
    }
}

/// The S3 error code in an error response body (`<Code>NoSuchKey</Code>`).
fn error_code(body: &str) -> Option<&str> {
    let s = body.find("<Code>")? + 6;
    let e = body[s..].find("</Code>")? + s;
    body.get(s..e)
}

fn error_message(body: &str) -> Option<&str> {
    let s = body.find("<Message>")? + 9;
    let e = body[s..].find("</Message>")? + s;
    body.get(s..e)
}

/// CRC-32C as S3 spells it: base64 of the big-endian value.
fn crc32c_b64(data: &[u8]) -> String {
    b64(&crc32c::crc32c(data).to_be_bytes())
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn md5_b64(data: &[u8]) -> String {
    use md5::Digest as _;
    b64(&md5::Md5::digest(data))
}

/// Reads what is left of a body, so that the connection goes back to the pool.
fn drain(r: &mut Resp) {
    let _ = io::copy(&mut r.body_mut().as_reader(), &mut io::sink());
}

fn header<'a>(r: &'a Resp, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Inner {
    /// A signed ListObjectsV2 request for one page of keys under `dir`; `delimiter`: one
    /// level only (sub-prefixes are reported, not descended).
    fn list_req(&self, dir: &str, delimiter: bool, token: Option<&str>) -> Req<'static> {
        let mut a = self.bucket.list_objects_v2(Some(&self.creds));
        a.with_prefix(dir);
        if delimiter {
            a.with_delimiter("/");
        }
        if let Some(t) = token {
            a.with_continuation_token(t);
        }
        Req {
            method: "GET",
            url: a.sign(SIGN_FOR),
            headers: vec![],
            body: &[],
        }
    }

    fn full(&self, key: &str) -> String {
        if self.cfg.prefix.is_empty() {
            key.to_string()
        } else if key.is_empty() {
            self.cfg.prefix.clone()
        } else {
            format!("{}/{key}", self.cfg.prefix)
        }
    }

    /// Names a key for messages: endpoint, bucket and key (never credentials).
    fn describe(&self, key: &str) -> String {
        format!(
            "S3 {} bucket {} key {}",
            self.cfg.endpoint,
            self.cfg.bucket,
            self.full(key)
        )
    }

    fn describe_full(&self, full: &str) -> String {
        format!(
            "S3 {} bucket {} key {full}",
            self.cfg.endpoint, self.cfg.bucket
        )
    }

    /// Sends a request, retrying transient failures until the deadline. Returns the
    /// response of the first attempt that was not transient (any status).
    fn send<'b>(&self, what: &str, op: &str, mk: &dyn Fn() -> Req<'b>) -> Result<Resp> {
        self.send_n(what, op, mk).map(|(r, _)| r)
    }

    /// [`Inner::send`], also giving the number of attempts made.
    fn send_n<'b>(&self, what: &str, op: &str, mk: &dyn Fn() -> Req<'b>) -> Result<(Resp, u32)> {
        self.send_within(what, op, mk, self.cfg.timeout)
    }

    /// [`Inner::send_n`] with its own deadline instead of the configured timeout.
    fn send_within<'b>(
        &self,
        what: &str,
        op: &str,
        mk: &dyn Fn() -> Req<'b>,
        timeout: Duration,
    ) -> Result<(Resp, u32)> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let r = mk();
            let left = deadline.saturating_duration_since(Instant::now());
            let t0 = Instant::now();
            let why = match self.attempt(&r, left.max(Duration::from_secs(1))) {
                Ok(resp) => {
                    let s = resp.status().as_u16();
                    if log::log_enabled!(log::Level::Debug) {
                        // one line per request (the body, if any, is read after this)
                        let range = r.headers.iter().find(|(k, _)| *k == "range");
                        log::debug!(
                            "S3 {op} {} {}{} -> {s} in {:.1?}",
                            r.method,
                            r.url.path(),
                            range.map_or(String::new(), |(_, v)| format!(" {v}")),
                            t0.elapsed()
                        );
                    }
                    if s >= 500 || s == 429 {
                        let mut resp = resp;
                        let body = resp.body_mut().read_to_string().unwrap_or_default();
                        format!("HTTP {s} {}", error_code(&body).unwrap_or(""))
                    } else {
                        return Ok((resp, attempt));
                    }
                }
                Err(e) => match e {
                    ureq::Error::Io(_)
                    | ureq::Error::Timeout(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
                    | ureq::Error::Protocol(_) => e.to_string(),
                    e => return Err(Error::new(ErrorKind::Io, format!("{what}: {op}: {e}"))),
                },
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{what}: {op}: unavailable after {attempt} attempts in {:.0?}: {why}",
                        now - start
                    ),
                ));
            }
            log::debug!("{what}: {op}: {why}; retrying");
            backoff.pause(deadline - now);
        }
    }

    fn attempt(&self, r: &Req<'_>, timeout: Duration) -> std::result::Result<Resp, ureq::Error> {
        let uri = r.url.as_str();
        let a = &self.agent;
        macro_rules! go {
            ($b:expr, send) => {{
                let mut b = $b.config().timeout_global(Some(timeout)).build();
                for (k, v) in &r.headers {
                    b = b.header(*k, v);
                }
                b.send(r.body)
            }};
            ($b:expr, call) => {{
                let mut b = $b.config().timeout_global(Some(timeout)).build();
                for (k, v) in &r.headers {
                    b = b.header(*k, v);
                }
                b.call()
            }};
        }
        match r.method {
            "PUT" => go!(a.put(uri), send),
            "POST" => go!(a.post(uri), send),
            "GET" => go!(a.get(uri), call),
            "HEAD" => go!(a.head(uri), call),
            _ => go!(a.delete(uri), call),
        }
    }

    /// An error for a final non-2xx answer.
    fn status_error(&self, what: &str, op: &str, mut resp: Resp) -> Error {
        let s = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        let code = error_code(&body).unwrap_or("");
        let msg = error_message(&body).unwrap_or("");
        let kind = match (s, code) {
            (404, "NoSuchKey") | (404, "") => ErrorKind::NotFound,
            (401 | 403, _) => ErrorKind::Refused,
            (412, _) => ErrorKind::Conflict,
            (400, "BadDigest" | "InvalidDigest" | "XAmzContentChecksumMismatch") => {
                ErrorKind::Corruption
            }
            _ => ErrorKind::Invalid,
        };
        let mut line = format!("{what}: {op}: HTTP {s}");
        if !code.is_empty() {
            line.push(' ');
            line.push_str(code);
        }
        if !msg.is_empty() {
            line.push_str(" (");
            line.push_str(&msg.replace(['\n', '\r'], " "));
            line.push(')');
        }
        Error::new(kind, line)
    }

    /// `true` when the object was written; `false` on 412 (exists; only with
    /// `if_none_match`).
    fn put_once(&self, key: &str, data: &[u8], if_none_match: bool) -> Result<bool> {
        let full = self.full(key);
        let what = self.describe_full(&full);
        let crc = crc32c_b64(data);
        let mk = || {
            let mut a = self.bucket.put_object(Some(&self.creds), &full);
            a.headers_mut().insert("x-amz-checksum-crc32c", crc.clone());
            let mut headers = vec![("x-amz-checksum-crc32c", crc.clone())];
            if if_none_match {
                headers.push(("if-none-match", "*".to_string()));
            }
            Req {
                method: "PUT",
                url: a.sign(SIGN_FOR),
                headers,
                body: data,
            }
        };
        let (mut resp, attempts) = self.send_n(&what, "PUT", &mk)?;
        match resp.status().as_u16() {
            200..=299 => {
                drain(&mut resp);
                Ok(true)
            }
            412 if if_none_match => {
                drain(&mut resp);
                // After a retry, the 412 may answer an earlier attempt of ours that was
                // stored although its answer was lost: the same bytes there are ours.
                if attempts > 1 && self.get(key, None).is_ok_and(|have| have == data) {
                    return Ok(true);
                }
                Ok(false)
            }
            _ => Err(self.status_error(&what, "PUT", resp)),
        }
    }

    fn exists_error(&self, key: &str) -> Error {
        Error::conflict(format!("{}: already exists", self.describe(key)))
    }

    /// Create-only PUT (see the module docs).
    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        let cond = self.conditional.load(Ordering::Relaxed);
        if !cond && self.head(key)?.is_some() {
            return Err(self.exists_error(key));
        }
        if self.put_once(key, data, cond)? {
            Ok(())
        } else {
            Err(self.exists_error(key))
        }
    }

    fn head(&self, key: &str) -> Result<Option<u64>> {
        let full = self.full(key);
        let what = self.describe_full(&full);
        let mk = || Req {
            method: "HEAD",
            url: self
                .bucket
                .head_object(Some(&self.creds), &full)
                .sign(SIGN_FOR),
            headers: vec![],
            body: &[],
        };
        let resp = self.send(&what, "HEAD", &mk)?;
        match resp.status().as_u16() {
            200..=299 => {
                let size = header(&resp, "content-length")
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Error::corruption(format!("{what}: HEAD: no valid Content-Length"))
                    })?;
                Ok(Some(size))
            }
            // A HEAD answer has no body to tell a missing key from a missing bucket; the
            // catalog's marker was read at open, so the bucket exists.
            404 => Ok(None),
            _ => Err(self.status_error(&what, "HEAD", resp)),
        }
    }

    fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Vec<u8>> {
        self.get_part(key, range, false)
    }

    /// [`Inner::get`]; with `short_ok`, a range that runs past the object's end gives the
    /// bytes up to the end instead of an error (read-ahead windows).
    fn get_part(&self, key: &str, range: Option<(u64, u64)>, short_ok: bool) -> Result<Vec<u8>> {
        let full = self.full(key);
        let what = self.describe_full(&full);
        let range_h = range.map(|(off, len)| format!("bytes={off}-{}", off + len - 1));
        let mk = || {
            let mut a = self.bucket.get_object(Some(&self.creds), &full);
            a.headers_mut().insert("x-amz-checksum-mode", "ENABLED");
            let mut headers = vec![("x-amz-checksum-mode", "ENABLED".to_string())];
            if let Some(r) = &range_h {
                headers.push(("range", r.clone()));
            }
            Req {
                method: "GET",
                url: a.sign(SIGN_FOR),
                headers,
                body: &[],
            }
        };
        // The body is read inside the retry: a connection cut mid-body is retried too.
        let start = Instant::now();
        loop {
            let mut resp = self.send(&what, "GET", &mk)?;
            let status = resp.status().as_u16();
            if status == 416 {
                let (off, len) = range.unwrap_or((0, 0));
                return Err(Error::corruption(format!(
                    "{what}: shorter than {len} bytes at offset {off}"
                )));
            }
            if !(200..=299).contains(&status) {
                return Err(self.status_error(&what, "GET", resp));
            }
            let declared = header(&resp, "content-length").and_then(|v| v.parse::<u64>().ok());
            let crc = header(&resp, "x-amz-checksum-crc32c").map(str::to_string);
            let whole_object = status == 200;
            let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(1 << 30) as usize);
            match resp.body_mut().as_reader().read_to_end(&mut buf) {
                Ok(_) => {}
                Err(e) if start.elapsed() < self.cfg.timeout => {
                    log::debug!("{what}: GET body: {e}; retrying");
                    continue;
                }
                Err(e) => return Err(Error::new(ErrorKind::Io, format!("{what}: GET body: {e}"))),
            }
            if let Some(n) = declared {
                if n != buf.len() as u64 {
                    return Err(Error::corruption(format!(
                        "{what}: GET: {} bytes received, Content-Length says {n}",
                        buf.len()
                    )));
                }
            }
            // Only a whole single-PUT object's checksum is a CRC of its bytes (a multipart
            // one's is "crc-of-crcs-N").
            if let (true, Some(c)) = (whole_object, crc) {
                if !c.contains('-') && c != crc32c_b64(&buf) {
                    return Err(Error::corruption(format!(
                        "{what}: GET: the bytes do not match the stored CRC-32C"
                    )));
                }
            }
            return match range {
                None => Ok(buf),
                Some((off, len)) => {
                    let want = usize::try_from(len)
                        .map_err(|_| Error::invalid(format!("{what}: range too large")))?;
                    let data = if whole_object {
                        // The server ignored the Range header.
                        let s = usize::try_from(off).unwrap_or(usize::MAX).min(buf.len());
                        buf.split_off(s)
                    } else {
                        buf
                    };
                    if data.len() < want && !short_ok {
                        return Err(Error::corruption(format!(
                            "{what}: shorter than {len} bytes at offset {off}"
                        )));
                    }
                    let mut data = data;
                    data.truncate(want);
                    Ok(data)
                }
            };
        }
    }

    fn delete_full(&self, full: &str) -> Result<()> {
        self.delete_within(full, self.cfg.timeout)
    }

    fn delete_within(&self, full: &str, timeout: Duration) -> Result<()> {
        let what = self.describe_full(full);
        let mk = || Req {
            method: "DELETE",
            url: self
                .bucket
                .delete_object(Some(&self.creds), full)
                .sign(SIGN_FOR),
            headers: vec![],
            body: &[],
        };
        let (mut resp, _) = self.send_within(&what, "DELETE", &mk, timeout)?;
        match resp.status().as_u16() {
            200..=299 | 404 => {
                drain(&mut resp);
                Ok(())
            }
            _ => Err(self.status_error(&what, "DELETE", resp)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        let dir = if prefix.is_empty() {
            if self.cfg.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", self.cfg.prefix)
            }
        } else {
            format!("{}/", self.full(prefix))
        };
        let what = format!(
            "S3 {} bucket {} prefix {dir}",
            self.cfg.endpoint, self.cfg.bucket
        );
        let mut out = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let mk = || self.list_req(&dir, true, token.as_deref());
            let mut resp = self.send(&what, "LIST", &mk)?;
            if resp.status().as_u16() != 200 {
                let e = self.status_error(&what, "LIST", resp);
                // A 404 on a listing is a missing bucket, never an empty prefix.
                return Err(if e.kind() == ErrorKind::NotFound {
                    Error::invalid(e.message().to_string())
                } else {
                    e
                });
            }
            let body = resp
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .map_err(|e| Error::new(ErrorKind::Io, format!("{what}: LIST: {e}")))?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body)
                .map_err(|e| Error::corruption(format!("{what}: LIST: unreadable answer ({e})")))?;
            for o in page.contents {
                let Some(name) = o.key.strip_prefix(&dir) else {
                    continue;
                };
                if name.is_empty() || name.starts_with('.') {
                    // A "directory marker" object, or the store's own names.
                    continue;
                }
                if name.contains('/') {
                    out.damaged.push(name.to_string());
                    continue;
                }
                out.objects.push(ObjectInfo {
                    name: name.to_string(),
                    size: o.size.unwrap_or(0),
                });
            }
            for p in page.common_prefixes {
                let name = p
                    .prefix
                    .strip_prefix(&dir)
                    .and_then(|n| n.strip_suffix('/'))
                    .unwrap_or("");
                if name.starts_with('.') {
                    continue;
                }
                if name.is_empty() || name.contains('/') {
                    out.damaged.push(p.prefix.clone());
                } else {
                    out.prefixes.push(name.to_string());
                }
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.objects.sort_by(|a, b| a.name.cmp(&b.name));
        out.prefixes.sort();
        out.prefixes.dedup();
        out.damaged.sort();
        Ok(out)
    }

    // --- multipart ---

    fn mp_create(&self, full: &str) -> Result<String> {
        let what = self.describe_full(full);
        let mk = || Req {
            method: "POST",
            url: self
                .bucket
                .create_multipart_upload(Some(&self.creds), full)
                .sign(SIGN_FOR),
            headers: vec![],
            body: &[],
        };
        let mut resp = self.send(&what, "CreateMultipartUpload", &mk)?;
        if !resp.status().is_success() {
            return Err(self.status_error(&what, "CreateMultipartUpload", resp));
        }
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Error::new(ErrorKind::Io, format!("{what}: {e}")))?;
        let r = rusty_s3::actions::CreateMultipartUpload::parse_response(&body)
            .map_err(|e| Error::corruption(format!("{what}: CreateMultipartUpload: {e}")))?;
        Ok(r.upload_id().to_string())
    }

    fn mp_part(&self, full: &str, upload_id: &str, number: u16, data: &[u8]) -> Result<String> {
        let what = self.describe_full(full);
        let md5 = md5_b64(data);
        let mk = || {
            let mut a = self
                .bucket
                .upload_part(Some(&self.creds), full, number, upload_id);
            a.headers_mut().insert("content-md5", md5.clone());
            Req {
                method: "PUT",
                url: a.sign(SIGN_FOR),
                headers: vec![("content-md5", md5.clone())],
                body: data,
            }
        };
        let op = format!("UploadPart {number}");
        let mut resp = self.send(&what, &op, &mk)?;
        if !resp.status().is_success() {
            return Err(self.status_error(&what, &op, resp));
        }
        drain(&mut resp);
        header(&resp, "etag")
            .map(str::to_string)
            .ok_or_else(|| Error::corruption(format!("{what}: {op}: no ETag in the answer")))
    }

    fn mp_complete(
        &self,
        full: &str,
        upload_id: &str,
        etags: &[String],
        cond: bool,
    ) -> Result<bool> {
        let what = self.describe_full(full);
        let body = rusty_s3::actions::CompleteMultipartUpload::new(
            &self.bucket,
            Some(&self.creds),
            full,
            upload_id,
            etags.iter().map(String::as_str),
        )
        .body();
        let mk = || {
            let a = self.bucket.complete_multipart_upload(
                Some(&self.creds),
                full,
                upload_id,
                etags.iter().map(String::as_str),
            );
            let mut headers = vec![];
            if cond {
                headers.push(("if-none-match", "*".to_string()));
            }
            Req {
                method: "POST",
                url: a.sign(SIGN_FOR),
                headers,
                body: body.as_bytes(),
            }
        };
        let mut resp = self.send(&what, "CompleteMultipartUpload", &mk)?;
        let s = resp.status().as_u16();
        if s == 412 && cond {
            return Ok(false);
        }
        if !(200..=299).contains(&s) {
            return Err(self.status_error(&what, "CompleteMultipartUpload", resp));
        }
        // S3 may answer 200 with an error document (the failure came late).
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if text.contains("<Error>") {
            let code = error_code(&text).unwrap_or("?");
            return Err(Error::new(
                ErrorKind::Io,
                format!("{what}: CompleteMultipartUpload: {code}"),
            ));
        }
        Ok(true)
    }

    fn mp_abort(&self, full: &str, upload_id: &str) {
        let what = self.describe_full(full);
        let mk = || Req {
            method: "DELETE",
            url: self
                .bucket
                .abort_multipart_upload(Some(&self.creds), full, upload_id)
                .sign(SIGN_FOR),
            headers: vec![],
            body: &[],
        };
        // The upload failed already: the abort gets a short deadline, so that the failure is
        // reported soon. An upload left unaborted is invisible and holds only storage (a
        // bucket lifecycle rule AbortIncompleteMultipartUpload reclaims it).
        let within = self.cfg.timeout.min(ABORT_TIMEOUT);
        match self.send_within(&what, "AbortMultipartUpload", &mk, within) {
            Ok((r, _)) if r.status().is_success() || r.status().as_u16() == 404 => {}
            Ok((r, _)) => log::warn!("{}", self.status_error(&what, "AbortMultipartUpload", r)),
            Err(e) => log::warn!("{e}"),
        }
    }
}

/// Each part's number and ETag (or why it failed), as the uploaders finish them.
type PartResults = Arc<Mutex<Vec<(u16, Result<String>)>>>;

/// A running multipart upload: parts go to a few uploader threads through a bounded
/// queue, so at most `PART_THREADS + 1` parts are in memory besides the one filling.
struct Multipart {
    full: String,
    upload_id: String,
    tx: Option<SyncSender<(u16, Vec<u8>)>>,
    threads: Vec<JoinHandle<()>>,
    results: PartResults,
    failed: Arc<AtomicBool>,
    next: u16,
}

impl Multipart {
    fn start(inner: &Arc<Inner>, full: String) -> Result<Multipart> {
        let upload_id = inner.mp_create(&full)?;
        let (tx, rx) = sync_channel::<(u16, Vec<u8>)>(1);
        let rx = Arc::new(Mutex::new(rx));
        let results = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let threads = (0..PART_THREADS)
            .map(|_| {
                let (inner, rx, results, failed) =
                    (inner.clone(), rx.clone(), results.clone(), failed.clone());
                let (full, id) = (full.clone(), upload_id.clone());
                std::thread::spawn(move || part_worker(&inner, &full, &id, &rx, &results, &failed))
            })
            .collect();
        Ok(Multipart {
            full,
            upload_id,
            tx: Some(tx),
            threads,
            results,
            failed,
            next: 1,
        })
    }

    fn push(&mut self, part: Vec<u8>) -> io::Result<()> {
        if self.failed.load(Ordering::Relaxed) || self.next == 10_000 {
            return Err(io::Error::other(format!(
                "S3 upload of {} failed (see the error at commit)",
                self.full
            )));
        }
        let n = self.next;
        self.next += 1;
        self.tx
            .as_ref()
            .ok_or_else(|| io::Error::other("upload finished"))?
            .send((n, part))
            .map_err(|_| io::Error::other(format!("S3 upload of {}: uploaders gone", self.full)))
    }

    /// Waits for every part; their ETags in order, or the first error.
    fn finish(&mut self) -> Result<Vec<String>> {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut res = std::mem::take(&mut *self.results.lock().map_err(|_| poisoned())?);
        res.sort_by_key(|(n, _)| *n);
        if res.len() != usize::from(self.next - 1) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("S3 upload of {}: a part uploader stopped", self.full),
            ));
        }
        res.into_iter().map(|(_, r)| r).collect()
    }
}

fn poisoned() -> Error {
    Error::invalid("S3 upload: poisoned lock")
}

fn part_worker(
    inner: &Inner,
    full: &str,
    upload_id: &str,
    rx: &Mutex<Receiver<(u16, Vec<u8>)>>,
    results: &Mutex<Vec<(u16, Result<String>)>>,
    failed: &AtomicBool,
) {
    loop {
        let next = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok((n, data)) = next else { return };
        let r = if failed.load(Ordering::Relaxed) {
            Err(Error::new(ErrorKind::Io, "skipped after a failed part"))
        } else {
            inner.mp_part(full, upload_id, n, &data)
        };
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        if let Ok(mut v) = results.lock() {
            v.push((n, r));
        }
    }
}

/// An object being written: kept in memory up to [`MULTIPART_THRESHOLD`], then uploaded
/// in parts as it grows.
struct S3Writer {
    inner: Arc<Inner>,
    key: String,
    buf: Vec<u8>,
    mp: Option<Multipart>,
    done: bool,
    /// The first error of a `write`, returned by `commit`.
    error: Option<Error>,
}

impl Write for S3Writer {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.mp.is_none() && self.buf.len() > MULTIPART_THRESHOLD {
            let full = self.inner.full(&self.key);
            // Refuse early when the object exists (the HEAD path; conditional servers
            // refuse at completion).
            if !self.inner.conditional.load(Ordering::Relaxed) {
                match self.inner.head(&self.key) {
                    Ok(None) => {}
                    Ok(Some(_)) => return Err(self.fail(self.inner.exists_error(&self.key))),
                    Err(e) => return Err(self.fail(e)),
                }
            }
            match Multipart::start(&self.inner, full) {
                Ok(mp) => self.mp = Some(mp),
                Err(e) => return Err(self.fail(e)),
            }
        }
        if let Some(mp) = &mut self.mp {
            while self.buf.len() >= PART_SIZE {
                let rest = self.buf.split_off(PART_SIZE);
                let part = std::mem::replace(&mut self.buf, rest);
                mp.push(part)?;
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl S3Writer {
    /// Keeps `e` for `commit` (which returns it with its kind) and gives it to `write`.
    fn fail(&mut self, e: Error) -> io::Error {
        let io = io::Error::other(e.to_string());
        self.error = Some(e);
        io
    }

    fn commit_multipart(&mut self) -> Result<()> {
        let Some(mp) = self.mp.as_mut() else {
            return Ok(());
        };
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            mp.push(last)
                .map_err(|e| Error::new(ErrorKind::Io, e.to_string()))?;
        }
        let etags = mp.finish()?;
        let cond = self.inner.conditional.load(Ordering::Relaxed);
        if !cond && self.inner.head(&self.key)?.is_some() {
            return Err(self.inner.exists_error(&self.key));
        }
        if self
            .inner
            .mp_complete(&mp.full, &mp.upload_id, &etags, cond)?
        {
            Ok(())
        } else {
            Err(self.inner.exists_error(&self.key))
        }
    }
}

impl ObjectWriter for S3Writer {
    fn commit(mut self: Box<Self>, _durability: Durability) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.mp.is_none() {
            self.done = true;
            let buf = std::mem::take(&mut self.buf);
            return self.inner.put_new(&self.key, &buf);
        }
        let r = self.commit_multipart();
        if r.is_ok() {
            self.done = true;
        }
        // Drop aborts an unfinished upload.
        r
    }
    fn describe(&self) -> String {
        self.inner.describe(&self.key)
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        if let Some(mp) = &mut self.mp {
            if !self.done {
                mp.tx = None;
                for t in mp.threads.drain(..) {
                    let _ = t.join();
                }
                self.inner.mp_abort(&mp.full, &mp.upload_id);
            }
        }
    }
}

impl S3Repo {
    /// The same-host part of a lock: an `flock` on a file in [`S3Config::lock_dir`].
    fn local_lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        let dir = &self.inner.cfg.lock_dir;
        ensure_lock_dir(dir)?;
        // The endpoint is part of the name: the same bucket and prefix on two servers are
        // two catalogs (two tests, one on Garage and one on s3s-fs, excluded each other).
        let full = format!(
            "{}/{}/{}",
            self.inner.cfg.endpoint,
            self.inner.cfg.url(),
            key
        );
        let mut name: String = full
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.len() > 160 {
            // within a file name's 255 bytes, still one name per lock
            let h = crc32c::crc32c(full.as_bytes());
            let h2 = crc32c::crc32c_append(!h, full.as_bytes());
            name = format!("{}-{h:08x}{h2:08x}", &name[name.len() - 140..]);
        }
        let path = dir.join(name);
        let f = open_lock_file(&path)?;
        super::local::flock(f, &path, mode, wait)
    }

    /// The lease objects of lock `key` (names), for tests and diagnostics.
    pub fn lease_holders(&self, key: &str) -> Result<Vec<String>> {
        check_key(key, true)?;
        Ok(lease::list(&self.inner, key)?
            .0
            .into_iter()
            .map(|e| e.name)
            .collect())
    }

    fn writer(&self, key: &str) -> S3Writer {
        S3Writer {
            inner: self.inner.clone(),
            key: key.to_string(),
            buf: Vec::new(),
            mp: None,
            done: false,
            error: None,
        }
    }
}

impl Repo for S3Repo {
    fn location(&self) -> String {
        self.inner.cfg.url()
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<()> {
        check_key(key, false)?;
        if data.len() > MULTIPART_THRESHOLD {
            let mut w = Box::new(self.writer(key));
            if let Err(e) = w.write_all(data) {
                return Err(w
                    .error
                    .take()
                    .unwrap_or_else(|| Error::new(ErrorKind::Io, e.to_string())));
            }
            return w.commit(Durability::Now);
        }
        self.inner.put_new(key, data)
    }

    fn atomic_create(&self) -> bool {
        // what `walnut init`'s probe found (recorded in walnut-s3.json, read at open)
        self.inner.conditional.load(Ordering::Relaxed)
    }

    fn create(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        check_key(key, false)?;
        Ok(Box::new(self.writer(key)))
    }

    fn get(&self, key: &str) -> Result<Blob> {
        check_key(key, false)?;
        Ok(Blob::Owned(self.inner.get(key, None)?))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_key(key, false)?;
        if len == 0 {
            return match self.head(key)? {
                Some(o) if o.size >= offset => Ok(Vec::new()),
                Some(_) => Err(Error::corruption(format!(
                    "{}: shorter than offset {offset}",
                    self.inner.describe(key)
                ))),
                None => Err(Error::not_found(format!(
                    "{}: no such object",
                    self.inner.describe(key)
                ))),
            };
        }
        if len >= SMALL_READ {
            return self.inner.get(key, Some((offset, len)));
        }
        // A small read (a header, a trailer, a binary search's probe, a small object's
        // bytes) is served from an aligned window fetched once: restore reads many small
        // ranges of the same object, each a round trip otherwise.
        if let Some(b) = self
            .inner
            .windows
            .lock()
            .map_err(|_| poisoned())?
            .find(key, offset, len)
        {
            return Ok(b);
        }
        let start = offset - offset % WINDOW;
        let end = (offset + len).div_ceil(WINDOW) * WINDOW;
        let data = Arc::new(self.inner.get_part(key, Some((start, end - start)), true)?);
        if start + (data.len() as u64) < offset + len {
            return Err(Error::corruption(format!(
                "{}: shorter than {len} bytes at offset {offset}",
                self.inner.describe(key)
            )));
        }
        let s = (offset - start) as usize;
        let out = data[s..s + len as usize].to_vec();
        self.inner
            .windows
            .lock()
            .map_err(|_| poisoned())?
            .add(key, start, data);
        Ok(out)
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        check_key(key, false)?;
        Ok(self.inner.head(key)?.map(|size| ObjectInfo {
            name: key.rsplit('/').next().unwrap_or(key).to_string(),
            size,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(key, false)?;
        self.inner.delete_full(&self.inner.full(key))
    }

    fn lock(&self, key: &str, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        check_key(key, true)?;
        // The local flock first: takers on this host wait on it without polling the
        // server; then the lease excludes other hosts (and outlives nothing: a dead
        // holder's lease expires).
        let Some(local) = self.local_lock(key, mode, wait)? else {
            return Ok(None);
        };
        let Some(lease) = lease::take(&self.inner, key, mode, wait)? else {
            return Ok(None);
        };
        // Dropped in order: the lease object is deleted before the flock is released.
        Ok(Some(RepoLock::new(Box::new((lease, local)))))
    }

    fn barrier(&self) -> Result<()> {
        // Every PUT that succeeded is durable.
        Ok(())
    }
}

/// Opens (or creates) a same-host lock file. `flock` needs no write access, so an existing
/// one is opened read-only: a lock file created by a run as root (mode 0644 under root's
/// umask) stays usable by the postgres user's `archive_command`, and the other way round.
/// A new one is created exclusively and then given mode 0666 whatever the umask. Never
/// through a symbolic link (`O_NOFOLLOW`: the directory is world-writable).
fn open_lock_file(path: &Path) -> Result<fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    loop {
        match fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("open lock file", path, e)),
        }
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => {
                // best effort: readable by every user is what matters, and 0644 is that
                let _ = f.set_permissions(fs::Permissions::from_mode(0o666));
                return Ok(f);
            }
            // created meanwhile by another taker: open theirs
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create lock file", path, e)),
        }
    }
}

/// Creates the lock directory when missing: sticky and world-writable, as `/run/lock`,
/// so that commands run as root and as the postgres user share its lock files.
fn ensure_lock_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o1777))
            .ctx("set permissions of", dir),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let md = fs::symlink_metadata(dir).ctx("stat", dir)?;
            if md.is_dir() {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "lock directory \"{}\" is not a directory",
                    dir.display()
                )))
            }
        }
        Err(e) => Err(Error::io("create directory", dir, e)),
    }
}

/// Reads `walnut-s3.json`: `None` when absent.
pub fn read_probe(repo: &S3Repo) -> Result<Option<S3Probe>> {
    match repo.get(S3_CONFIG_KEY) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::corruption(format!(
                "{}: not a valid walnut-s3.json ({e})",
                repo.inner.describe(S3_CONFIG_KEY)
            ))
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_error_codes() {
        // RFC 3720's test vector: 32 bytes of zeros.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c_b64(&[0u8; 32]), "ipE2qg==");
        assert_eq!(md5_b64(b""), "1B2M2Y8AsgTpgAmY7PhCfg==");
        let body = "<Error><Code>NoSuchKey</Code><Message>gone\nreally</Message></Error>";
        assert_eq!(error_code(body), Some("NoSuchKey"));
        assert_eq!(error_message(body), Some("gone\nreally"));
        assert_eq!(error_code("<html/>"), None);
    }

    #[test]
    fn a_read_only_lock_file_of_another_user_still_locks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let f = open_lock_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o666,
            "created for every user"
        );
        drop(f);
        // as left by a root run under umask 022: not writable by anyone else
        fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).unwrap();
        let a =
            super::super::local::flock(open_lock_file(&p).unwrap(), &p, LockMode::Exclusive, false)
                .unwrap();
        assert!(a.is_some());
        let b =
            super::super::local::flock(open_lock_file(&p).unwrap(), &p, LockMode::Shared, false)
                .unwrap();
        assert!(b.is_none(), "the exclusive lock excludes");
        drop(a);
        // never through a link
        let l = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(open_lock_file(&l).is_err());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let cfg = S3Config {
            endpoint: "http://127.0.0.1:1".into(),
            region: "r".into(),
            bucket: "b".into(),
            prefix: "p".into(),
            path_style: true,
            access_key: "AKIDSECRETISH".into(),
            secret_key: "VERYSECRET".into(),
            session_token: Some("TOKENSECRET".into()),
            ca_file: None,
            timeout: Duration::from_secs(1),
            lock_dir: "/tmp".into(),
            lease: DEFAULT_LEASE,
            credentials_file: None,
            config_file: None,
        };
        let r = S3Repo::new(cfg).unwrap();
        let s = format!("{r:?}");
        assert!(
            !s.contains("VERYSECRET") && !s.contains("TOKENSECRET"),
            "{s}"
        );
        assert_eq!(r.location(), "s3://b/p");
    }
}
