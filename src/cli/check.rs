//! `walnut check --instance NAME`: its options and its output (the checks themselves are
//! [`crate::check`]).
//!
//! Each check gives one line: `OK`, `NOTICE` (worth knowing, not a failure) or `FAIL`. The
//! exit status is 0 only when nothing failed, 1 otherwise (2 is clap's bad usage).

use std::time::Duration;

use clap::Args;

use crate::check::{CheckOptions, Report, Status};
use crate::cli::{ConnArgs, InstanceArgs, OutputFormat};
use crate::error::Result;

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Seconds to wait for the switched segment to be archived and indexed.
    #[arg(long, default_value_t = 60)]
    pub archive_timeout: u64,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(a: CheckArgs) -> Result<i32> {
    let catalog = a.instance.catalog.open()?;
    let opts = CheckOptions {
        instance: a.instance.instance.clone(),
        conn: a.conn.params(),
        archive_timeout: Duration::from_secs(a.archive_timeout),
    };
    let report = crate::check::run(&catalog, &opts)?;
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print!("{}", render_text(&report)),
    }
    Ok(if report.ok { 0 } else { 1 })
}

/// One line per check, then a summary line.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.checks {
        let tag = match c.status {
            Status::Ok => "OK",
            Status::Notice => "NOTICE",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{tag:<7}{}: {}\n", c.check, c.detail));
    }
    match r.failed() {
        0 => out.push_str(&format!("instance \"{}\": all checks passed\n", r.instance)),
        failed => out.push_str(&format!(
            "instance \"{}\": {failed} check(s) failed\n",
            r.instance
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::CheckLine;

    #[test]
    fn text_has_a_line_per_check_and_a_summary() {
        let line = |check, status, detail: &str| CheckLine {
            check,
            status,
            detail: detail.into(),
        };
        let mut r = Report {
            instance: "db".into(),
            ok: false,
            checks: vec![
                line("connection", Status::Ok, "PostgreSQL 15"),
                line("data_checksums", Status::Notice, "off"),
                line("wal_level", Status::Fail, "minimal"),
            ],
        };
        assert_eq!(
            render_text(&r),
            "OK     connection: PostgreSQL 15\nNOTICE data_checksums: off\n\
             FAIL   wal_level: minimal\ninstance \"db\": 1 check(s) failed\n"
        );
        r.checks.truncate(2);
        assert!(render_text(&r).ends_with("instance \"db\": all checks passed\n"));
    }
}
