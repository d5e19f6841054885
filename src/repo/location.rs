//! Where a catalog is: a local directory or `s3://BUCKET/PREFIX`, with the settings an S3
//! catalog needs. The cli gathers options and environment into [`S3Settings`]; this module
//! fills the gaps from the config file and resolves them into a [`CatalogLocation`].
//!
//! Precedence, for each setting: the command line, then the environment (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, ...; applied by the cli), then the config file (`--config`, or
//! `/etc/walnut/walnut.conf` when it exists). Credentials come from `--s3-credentials FILE`
//! (or `s3-credentials` in the config file), else from `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`. They are never stored in the catalog.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::s3::S3Config;
use crate::error::{Error, IoContext, Result};

/// The config file read when `--config` is not given (only when it exists).
pub const DEFAULT_CONFIG: &str = "/etc/walnut/walnut.conf";
/// How long an S3 operation retries by default (PostgreSQL retries archive_command).
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(60);
/// Overrides the local directory of S3 catalogs' lock files.
pub const LOCK_DIR_ENV: &str = "WALNUT_LOCK_DIR";

/// A catalog's place.
#[derive(Clone, Debug)]
pub enum CatalogLocation {
    Local(PathBuf),
    S3(Box<S3Config>),
}

/// The S3 settings as given (each optional), before the config file and defaults.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `path` or `host`.
    pub uri_style: Option<String>,
    pub credentials: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Seconds.
    pub timeout: Option<u64>,
    /// `--config`: must exist when given.
    pub config: Option<PathBuf>,
}

impl CatalogLocation {
    /// Resolves `-B` (a directory, or `s3://BUCKET/PREFIX`). A scheme walnut does not know
    /// is an error, never a local path.
    pub fn parse(catalog: &Path, s: &S3Settings) -> Result<CatalogLocation> {
        let Some(text) = catalog.to_str() else {
            return Ok(CatalogLocation::Local(catalog.to_path_buf()));
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(CatalogLocation::Local(catalog.to_path_buf()));
        };
        if scheme != "s3" {
            return Err(Error::invalid(format!(
                "catalog \"{text}\": unknown scheme \"{scheme}://\" (give a directory or \
                 s3://BUCKET/PREFIX)"
            )));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_end_matches('/');
        check_bucket(bucket).map_err(|why| Error::invalid(format!("catalog \"{text}\": {why}")))?;
        super::check_prefix(prefix).map_err(|e| e.context(format!("catalog \"{text}\"")))?;
        Ok(CatalogLocation::S3(Box::new(s3_config(bucket, prefix, s)?)))
    }

    /// For messages: the directory or the `s3://` URL.
    pub fn display(&self) -> String {
        match self {
            CatalogLocation::Local(p) => p.display().to_string(),
            CatalogLocation::S3(c) => c.url(),
        }
    }

    /// The command-line options that name this location to a child walnut process
    /// (look-ahead pusher, prefetch worker): `-B` and the resolved S3 settings. The
    /// credentials go through [`CatalogLocation::child_env`], never the command line.
    pub fn child_args(&self) -> Vec<OsString> {
        match self {
            CatalogLocation::Local(p) => vec!["-B".into(), p.into()],
            CatalogLocation::S3(c) => {
                let mut v: Vec<OsString> = vec![
                    "-B".into(),
                    c.url().into(),
                    "--s3-endpoint".into(),
                    c.endpoint.clone().into(),
                    "--s3-region".into(),
                    c.region.clone().into(),
                    "--s3-uri-style".into(),
                    if c.path_style { "path" } else { "host" }.into(),
                    "--s3-timeout".into(),
                    c.timeout.as_secs().max(1).to_string().into(),
                    // Everything is explicit: no config file may fill in other values.
                    "--config".into(),
                    "/dev/null".into(),
                ];
                if let Some(ca) = &c.ca_file {
                    v.push("--s3-ca-file".into());
                    v.push(ca.into());
                }
                v
            }
        }
    }

    /// Environment for a child process: the S3 credentials (see [`Self::child_args`]).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        match self {
            CatalogLocation::Local(_) => vec![],
            CatalogLocation::S3(c) => {
                let mut v = vec![
                    ("AWS_ACCESS_KEY_ID", c.access_key.clone()),
                    ("AWS_SECRET_ACCESS_KEY", c.secret_key.clone()),
                ];
                if let Some(t) = &c.session_token {
                    v.push(("AWS_SESSION_TOKEN", t.clone()));
                }
                v
            }
        }
    }

    /// Adds [`Self::child_args`] and [`Self::child_env`] to a command.
    pub fn pass_to(&self, cmd: &mut std::process::Command) {
        cmd.args(self.child_args());
        if matches!(self, CatalogLocation::S3(_)) {
            // The child gets exactly this token, or none: never a stale one from the
            // environment beside credentials that came from a file.
            cmd.env_remove("AWS_SESSION_TOKEN");
        }
        for (k, v) in self.child_env() {
            cmd.env(k, v);
        }
    }
}

/// S3 bucket naming rules (the common subset): 3 to 63 of `a-z 0-9 . -`.
fn check_bucket(b: &str) -> std::result::Result<(), String> {
    let ok = (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{b}\" is not a bucket name (3 to 63 of a-z, 0-9, '.' and '-')"
        ))
    }
}

/// `key = value` lines; `#` comments and `[section]` headers ignored.
fn read_conf(p: &Path) -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(p).ctx("read config file", p)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            out.push(("[".to_string(), line.to_string()));
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::invalid(format!(
                "\"{}\" line {}: not \"name = value\"",
                p.display(),
                i + 1
            )));
        };
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// The settings of the config file, merged under the given ones.
fn merge_config(s: &S3Settings) -> Result<S3Settings> {
    let path = match &s.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    };
    let mut out = s.clone();
    out.config = path.clone();
    let Some(path) = path else {
        return Ok(out);
    };
    for (k, v) in read_conf(&path)? {
        let bad = || {
            Error::invalid(format!(
                "\"{}\": bad value for {k}: \"{v}\"",
                path.display()
            ))
        };
        match k.as_str() {
            "[" => {}
            "s3-endpoint" => _ = out.endpoint.get_or_insert(v),
            "s3-region" => _ = out.region.get_or_insert(v),
            "s3-uri-style" => _ = out.uri_style.get_or_insert(v),
            "s3-credentials" => _ = out.credentials.get_or_insert(v.into()),
            "s3-ca-file" => _ = out.ca_file.get_or_insert(v.into()),
            "s3-timeout" => {
                let t = parse_secs(&v).ok_or_else(bad)?;
                out.timeout.get_or_insert(t);
            }
            _ => {
                return Err(Error::invalid(format!(
                    "\"{}\": unknown setting \"{k}\"",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// The value of `name` in the config file `p` (`None` when it does not set it).
pub fn config_setting(p: &Path, name: &str) -> Result<Option<String>> {
    Ok(read_conf(p)?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v))
}

/// `60` or `60s`.
pub fn parse_secs(v: &str) -> Option<u64> {
    v.trim().trim_end_matches('s').parse().ok()
}

/// Reads an AWS-style credentials file: `aws_access_key_id`, `aws_secret_access_key` and
/// optionally `aws_session_token`, from the `[default]` section or outside any section.
fn read_credentials(p: &Path) -> Result<(String, String, Option<String>)> {
    let (mut key, mut secret, mut token) = (None, None, None);
    let mut in_default = true;
    for (k, v) in read_conf(p)? {
        match k.as_str() {
            "[" => in_default = v == "[default]",
            _ if !in_default => {}
            "aws_access_key_id" => key = Some(v),
            "aws_secret_access_key" => secret = Some(v),
            "aws_session_token" => token = Some(v),
            _ => {}
        }
    }
    match (key, secret) {
        (Some(k), Some(s)) => Ok((k, s, token)),
        _ => Err(Error::invalid(format!(
            "credentials file \"{}\": needs aws_access_key_id and aws_secret_access_key",
            p.display()
        ))),
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn s3_config(bucket: &str, prefix: &str, given: &S3Settings) -> Result<S3Config> {
    let s = merge_config(given)?;
    let region = s.region.clone().unwrap_or_else(|| "us-east-1".to_string());
    let endpoint = s
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let url: url::Url = endpoint
        .parse()
        .map_err(|e| Error::invalid(format!("S3 endpoint \"{endpoint}\": not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::invalid(format!(
            "S3 endpoint \"{endpoint}\": the scheme must be https:// (or http://)"
        )));
    }
    let host = url.host_str().unwrap_or("");
    let ip_or_local =
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
    let path_style = match s.uri_style.as_deref() {
        None => ip_or_local,
        Some("path") => true,
        Some("host") => false,
        Some(o) => {
            return Err(Error::invalid(format!(
                "--s3-uri-style \"{o}\": use path or host"
            )))
        }
    };
    let (access_key, secret_key, session_token) = match &s.credentials {
        Some(f) => read_credentials(f)?,
        None => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(sec)) => (k, sec, env("AWS_SESSION_TOKEN")),
            _ => {
                return Err(Error::invalid(format!(
                    "s3://{bucket}: no credentials (set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or give --s3-credentials FILE)"
                )))
            }
        },
    };
    let lock_dir = env(LOCK_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("walnut-locks"));
    Ok(S3Config {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        region,
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        path_style,
        access_key,
        secret_key,
        session_token,
        ca_file: s.ca_file.clone(),
        timeout: s
            .timeout
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_S3_TIMEOUT)
            .max(Duration::from_secs(1)),
        lock_dir,
        lease: lease_from_env()?,
        credentials_file: s.credentials.clone(),
        config_file: s.config.clone().filter(|p| p != Path::new("/dev/null")),
    })
}

/// The lease of S3 locks: `WALNUT_S3_LEASE_SECS`, else the default (60 s).
fn lease_from_env() -> Result<Duration> {
    match env(super::s3::LEASE_ENV) {
        None => Ok(super::s3::DEFAULT_LEASE),
        Some(v) => match parse_secs(&v) {
            Some(n) if n >= 1 => Ok(Duration::from_secs(n)),
            _ => Err(Error::invalid(format!(
                "{}=\"{v}\": give a number of seconds (at least 1)",
                super::s3::LEASE_ENV
            ))),
        },
    }
}

impl S3Config {
    /// The options that name this catalog to `walnut-fetch` in a restore_command: `-B` and
    /// the settings, with the credentials and config files by name (never credentials
    /// themselves; credentials from the environment must be in the server's).
    pub fn fetch_args(&self) -> String {
        let mut a = format!(
            "-B {} --s3-endpoint {} --s3-region {} --s3-uri-style {} --s3-timeout {}",
            self.url(),
            self.endpoint,
            self.region,
            if self.path_style { "path" } else { "host" },
            self.timeout.as_secs().max(1)
        );
        for (opt, p) in [
            ("--s3-ca-file", &self.ca_file),
            ("--s3-credentials", &self.credentials_file),
            ("--config", &self.config_file),
        ] {
            if let Some(p) = p {
                a.push_str(&format!(" {opt} {}", p.display()));
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds_file(d: &Path) -> PathBuf {
        let p = d.join("creds");
        fs::write(
            &p,
            "[other]\naws_access_key_id = NO\n[default]\naws_access_key_id = AK\n\
             aws_secret_access_key = SK\n",
        )
        .unwrap();
        p
    }

    #[test]
    fn locations_parse_and_unknown_schemes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = S3Settings {
            endpoint: Some("http://127.0.0.1:9000".into()),
            credentials: Some(creds_file(d.path())),
            config: Some(d.path().join("none.conf")),
            ..Default::default()
        };
        // --config names a file that must exist
        assert!(CatalogLocation::parse(Path::new("s3://bkt/p"), &s).is_err());
        let conf = d.path().join("w.conf");
        fs::write(&conf, "# c\ns3-region = garage\ns3-timeout = 7s\n").unwrap();
        let s = S3Settings {
            config: Some(conf),
            ..s
        };
        let CatalogLocation::S3(c) =
            CatalogLocation::parse(Path::new("s3://bkt/a/b/"), &s).unwrap()
        else {
            panic!()
        };
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bkt", "a/b"));
        assert_eq!((c.access_key.as_str(), c.secret_key.as_str()), ("AK", "SK"));
        assert_eq!(c.region, "garage");
        assert_eq!(c.timeout, Duration::from_secs(7));
        assert!(c.path_style, "an IP endpoint is path style");
        assert_eq!(c.url(), "s3://bkt/a/b");
        for bad in [
            "foo://x/y",
            "S3://x/y",
            "s3://B/x",
            "s3://bkt/../x",
            "s3://bkt/a//b",
        ] {
            let e = CatalogLocation::parse(Path::new(bad), &s).unwrap_err();
            assert!(
                e.to_string().contains(bad.split('/').next().unwrap()),
                "{e}"
            );
        }
        assert!(matches!(
            CatalogLocation::parse(Path::new("./s3/dir"), &s).unwrap(),
            CatalogLocation::Local(_)
        ));
        let host = S3Settings {
            endpoint: Some("https://s3.example.com".into()),
            ..s.clone()
        };
        let CatalogLocation::S3(c) = CatalogLocation::parse(Path::new("s3://bkt"), &host).unwrap()
        else {
            panic!()
        };
        assert!(!c.path_style);
        assert_eq!(c.prefix, "");
        let loc = CatalogLocation::S3(c);
        let args: Vec<String> = loc
            .child_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a.contains("SK")), "{args:?}");
        assert!(args.contains(&"host".to_string()), "{args:?}");
    }
}
