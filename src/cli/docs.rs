//! Shell completions and man pages, generated from the clap definitions so they never
//! drift from the options the binaries really take.

use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};

use crate::error::{Error, IoContext, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for (to standard output).
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args, Debug, Clone)]
pub struct ManArgs {
    /// Directory to write the man pages into (section 1: walnut.1, walnut-backup.1, ...,
    /// walnut-archive.1, walnut-fetch.1).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// Writes the completion script for `walnut` to standard output.
pub fn run_completions(a: CompletionsArgs) -> Result<i32> {
    let mut cmd = crate::cli::WalnutCli::command();
    let mut out = std::io::stdout();
    match a.shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "walnut", &mut out)
        }
        Shell::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "walnut", &mut out)
        }
        Shell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "walnut", &mut out)
        }
    }
    Ok(0)
}

/// Writes the man pages of the three binaries (and of each walnut subcommand) into a
/// directory, creating it; returns the files written.
pub fn write_man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).ctx("create directory", dir)?;
    let cmds = [
        crate::cli::WalnutCli::command(),
        crate::cli::archive::PushCli::command().name("walnut-archive"),
        crate::cli::archive::FetchCli::command().name("walnut-fetch"),
    ];
    for cmd in cmds {
        clap_mangen::generate_to(cmd, dir)
            .map_err(|e| Error::io("write man pages into", dir, e))?;
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ctx("read directory", dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    files.sort();
    Ok(files)
}

pub fn run_man(a: ManArgs) -> Result<i32> {
    let files = write_man_pages(&a.output)?;
    for f in &files {
        println!("{}", f.display());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_binary_and_subcommand() {
        let d = tempfile::tempdir().unwrap();
        let files = write_man_pages(d.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for n in [
            "walnut.1",
            "walnut-archive.1",
            "walnut-fetch.1",
            "walnut-backup.1",
            "walnut-check.1",
            "walnut-metrics.1",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let page = std::fs::read_to_string(d.path().join("walnut-check.1")).unwrap();
        assert!(
            page.contains(".TH") && page.contains("archive\\-timeout"),
            "{page}"
        );
    }
}
