//! The command-line layer: every clap struct, the dispatch, the printing and the exit
//! codes. The binaries in `src/bin/` only call [`walnut_main`], [`archive_main`] or
//! [`fetch_main`]; nothing below this module imports it, and the library never prints.
//!
//! Options shared by the binaries are defined once here (clap `Args` structs).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod check;
pub mod docs;
pub mod lifecycle;
pub mod metrics;
pub mod receive;
pub mod verify;
pub mod wal_index;

/// Where the catalog is. `WALNUT_CATALOG` may stand in for `-B`; the S3 settings may come
/// from the AWS variables or the config file too (see [`crate::repo::location`]).
#[derive(Args, Debug, Clone)]
pub struct CatalogArgs {
    /// Catalog directory, or s3://BUCKET/PREFIX.
    #[arg(short = 'B', long = "backup-path", env = "WALNUT_CATALOG")]
    pub catalog: PathBuf,
    /// S3 endpoint URL (https:// unless it says http://).
    #[arg(long = "s3-endpoint", env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long = "s3-region", env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// S3 URL style: path (default for an IP address or localhost) or host.
    #[arg(long = "s3-uri-style", value_parser = ["path", "host"])]
    pub s3_uri_style: Option<String>,
    /// File with aws_access_key_id and aws_secret_access_key (else the AWS_* variables).
    #[arg(long = "s3-credentials", value_name = "FILE")]
    pub s3_credentials: Option<PathBuf>,
    /// PEM file of the CA certificates that sign the S3 endpoint's.
    #[arg(long = "s3-ca-file", value_name = "FILE")]
    pub s3_ca_file: Option<PathBuf>,
    /// Seconds an S3 operation keeps retrying before it fails (default 60).
    #[arg(long = "s3-timeout", value_name = "SECONDS")]
    pub s3_timeout: Option<u64>,
    /// Config file with the same settings (default /etc/walnut/walnut.conf, when present).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl CatalogArgs {
    /// The library's catalog location: the options, the environment and the config file.
    pub fn location(&self) -> crate::Result<crate::repo::CatalogLocation> {
        let s = crate::repo::S3Settings {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            uri_style: self.s3_uri_style.clone(),
            credentials: self.s3_credentials.clone(),
            ca_file: self.s3_ca_file.clone(),
            timeout: self.s3_timeout,
            config: self.config.clone(),
        };
        crate::repo::CatalogLocation::parse(&self.catalog, &s)
    }

    /// Opens the catalog.
    pub fn open(&self) -> crate::Result<crate::catalog::Catalog> {
        crate::catalog::Catalog::open_at(&self.location()?)
    }

    /// Creates the catalog.
    pub fn init(&self) -> crate::Result<crate::catalog::Catalog> {
        crate::catalog::Catalog::init_at(&self.location()?)
    }
}

/// A catalog and an instance in it.
#[derive(Args, Debug, Clone)]
pub struct InstanceArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Instance name, as given to `add-instance`.
    #[arg(long)]
    pub instance: String,
}

/// libpq-style connection options; unset ones fall back to PGHOST, PGPORT, PGUSER,
/// PGDATABASE and then to the instance's stored configuration.
#[derive(Args, Debug, Clone, Default)]
pub struct ConnArgs {
    /// Server host or socket directory.
    #[arg(short = 'h', long = "host")]
    pub host: Option<String>,
    /// Server port.
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// User name.
    #[arg(short = 'U', long = "username")]
    pub user: Option<String>,
    /// Database name.
    #[arg(short = 'd', long = "dbname")]
    pub dbname: Option<String>,
}

impl ConnArgs {
    /// The library's connection settings.
    pub fn params(&self) -> crate::server::ConnParams {
        crate::server::ConnParams {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            dbname: self.dbname.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

#[derive(Parser, Debug)]
#[command(
    name = "walnut",
    version,
    about = "PostgreSQL backups whose cost follows what changed",
    disable_help_flag = true
)]
pub struct WalnutCli {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help, global = true)]
    pub help: Option<bool>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a catalog.
    Init(crate::cli::catalog::InitArgs),
    /// Register a PostgreSQL instance in the catalog.
    AddInstance(crate::cli::catalog::AddInstanceArgs),
    /// Decode WAL segment files and print their block indexes.
    WalIndex(crate::cli::wal_index::WalIndexArgs),
    /// Take a FULL, PAGE or DELTA backup.
    Backup(crate::cli::backup::BackupArgs),
    /// Restore a backup into a data directory, with recovery settings.
    Restore(crate::cli::backup::RestoreArgs),
    /// List backups, or with --archive the WAL archive.
    Show(ShowArgs),
    /// Verify a backup and its chain against stored checksums.
    Validate(crate::cli::backup::ValidateArgs),
    /// Store an instance's retention settings.
    SetConfig(crate::cli::lifecycle::SetConfigArgs),
    /// Show an instance's retention settings.
    ShowConfig(crate::cli::lifecycle::ShowConfigArgs),
    /// Delete a backup and its descendants, or what retention expires, and purge WAL.
    Delete(crate::cli::lifecycle::DeleteArgs),
    /// Merge an incremental backup with its ancestors into one FULL backup.
    Merge(crate::cli::lifecycle::MergeArgs),
    /// Pin a backup (--ttl, --expire-time) or note it.
    SetBackup(crate::cli::lifecycle::SetBackupArgs),
    /// Check that the server's settings and archiving work with this catalog.
    Check(crate::cli::check::CheckArgs),
    /// Write Prometheus metrics (node_exporter textfile format).
    Metrics(crate::cli::metrics::MetricsArgs),
    /// Stream WAL from the server into the archive (a long-running receiver).
    Receive(crate::cli::receive::ReceiveArgs),
    /// Restore a backup into a scratch directory, recover it, and check it (amcheck,
    /// pg_checksums, count(*) on every table); records the result.
    VerifyRestore(crate::cli::verify::VerifyRestoreArgs),
    /// Print a shell completion script (bash, zsh or fish).
    Completions(crate::cli::docs::CompletionsArgs),
    /// Write man pages for walnut, its subcommands, walnut-archive and walnut-fetch.
    Man(crate::cli::docs::ManArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ShowArgs {
    #[command(flatten)]
    pub catalog: CatalogArgs,
    /// Instance name (all instances when omitted, for backups).
    #[arg(long)]
    pub instance: Option<String>,
    /// Show one backup.
    #[arg(short = 'i', long = "backup-id")]
    pub backup_id: Option<String>,
    /// Show the WAL archive instead of backups.
    #[arg(long)]
    pub archive: bool,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// With --archive: decompress and check every archived file (slower).
    #[arg(long)]
    pub verify: bool,
    /// With --archive: the relations the archived WAL changed most (from the block
    /// indexes), with names when the server can be reached.
    #[arg(long, requires = "archive")]
    pub churn: bool,
    /// With --churn: count from this time or LSN on.
    #[arg(long, requires = "churn", value_name = "TIME|LSN")]
    pub since: Option<String>,
    /// With --churn: show this many relations (0: all).
    #[arg(long, requires = "churn", default_value_t = 20)]
    pub limit: usize,
    /// With --churn: do not connect to the server for names.
    #[arg(long, requires = "churn")]
    pub no_connect: bool,
    /// With --churn: connection options for the names (as backup takes them).
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Runs `walnut`; returns the process exit code.
pub fn run_walnut(cli: WalnutCli) -> crate::Result<i32> {
    match cli.command {
        Command::Init(a) => crate::cli::catalog::run_init(a),
        Command::AddInstance(a) => crate::cli::catalog::run_add_instance(a),
        Command::WalIndex(a) => crate::cli::wal_index::run(a),
        Command::Backup(a) => crate::cli::backup::run_backup(a),
        Command::Restore(a) => crate::cli::backup::run_restore(a),
        Command::Show(a) if a.archive => crate::cli::archive::run_show(a),
        Command::Show(a) => crate::cli::backup::run_show(a),
        Command::Validate(a) => crate::cli::backup::run_validate(a),
        Command::SetConfig(a) => crate::cli::lifecycle::run_set_config(a),
        Command::ShowConfig(a) => crate::cli::lifecycle::run_show_config(a),
        Command::Delete(a) => crate::cli::lifecycle::run_delete(a),
        Command::Merge(a) => crate::cli::lifecycle::run_merge(a),
        Command::SetBackup(a) => crate::cli::lifecycle::run_set_backup(a),
        Command::Check(a) => crate::cli::check::run(a),
        Command::Metrics(a) => crate::cli::metrics::run(a),
        Command::Receive(a) => crate::cli::receive::run(a),
        Command::VerifyRestore(a) => crate::cli::verify::run(a),
        Command::Completions(a) => crate::cli::docs::run_completions(a),
        Command::Man(a) => crate::cli::docs::run_man(a),
    }
}

/// `walnut`: parses the command line (bad usage exits 2, clap's), runs the command and
/// returns the exit code: the command's, or 1 after printing `walnut: error: ...`.
pub fn walnut_main() -> i32 {
    init_logging();
    let cli = WalnutCli::parse();
    match run_walnut(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("walnut: error: {e}");
            1
        }
    }
}

/// `walnut-archive` (archive_command): see [`archive::main_archive`].
pub fn archive_main() -> i32 {
    archive::main_archive()
}

/// `walnut-fetch` (restore_command): see [`archive::main_fetch`].
pub fn fetch_main() -> i32 {
    archive::main_fetch()
}

/// Sets up logging to stderr (`RUST_LOG` overrides; default info).
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .format_target(false)
        .try_init();
}

/// Parses the command line of a binary PostgreSQL runs (archive_command, restore_command):
/// `--help` and `--version` print and exit 0; a usage error prints and exits `usage_exit`
/// (what that binary's caller reads as a failure, never clap's 2).
pub fn parse_or_exit<P: Parser>(usage_exit: i32) -> P {
    match P::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { usage_exit } else { 0 });
        }
    }
}

/// Runs `f` with panics caught, for binaries whose exit code PostgreSQL interprets (a panic
/// must not exit 101). A panic prints one line, as PostgreSQL logs it:
/// `{prefix}: {what}: internal error: panic at FILE:LINE: MESSAGE`, and gives `None`.
/// Test hook: `WALNUT_TEST_PANIC` panics before `f` runs.
pub fn catch_panics<T>(
    prefix: &'static str,
    what: String,
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> Option<T> {
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        eprintln!(
            "{prefix}: {what}: internal error: panic at {at}: {}",
            msg.replace('\n', " ")
        );
    }));
    std::panic::catch_unwind(move || {
        if std::env::var_os("WALNUT_TEST_PANIC").is_some() {
            panic!("panic requested by WALNUT_TEST_PANIC");
        }
        f()
    })
    .ok()
}
