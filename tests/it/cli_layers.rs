//! The layering of issue 9: only `src/cli` (and the binaries) print, parse options with
//! clap or use the cli module; the library returns reports. Checked on the source text.
use std::path::{Path, PathBuf};

/// Files of other parts of issue 9 that still print or use clap until those parts land.
/// The test fails when a listed file no longer does (remove it then): the list only shrinks.
const PENDING: &[&str] = &[];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The offending lines of a library file: printing macros, clap or the cli module, outside
/// comments and before its test module.
fn offences(text: &str) -> Vec<String> {
    let bad = [
        "println!(",
        "print!(",
        "eprintln!(",
        "eprint!(",
        "crate::cli",
        "clap::",
        "use clap",
    ];
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        if let Some(b) = bad.iter().find(|b| code.contains(*b)) {
            found.push(format!("line {}: {b}: {}", n + 1, code));
        }
    }
    found
}

#[test]
fn only_the_cli_prints_and_parses_options() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    files.sort();
    let mut problems = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel.starts_with("src/cli/") || rel.starts_with("src/bin/") {
            continue;
        }
        let found = offences(&std::fs::read_to_string(f).unwrap());
        match (PENDING.contains(&rel.as_str()), found.is_empty()) {
            (false, false) => problems.push(format!("{rel}: {}", found.join("; "))),
            (true, true) => problems.push(format!("{rel} is clean now: remove it from PENDING")),
            _ => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The binaries only call the cli layer.
#[test]
fn binaries_are_thin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (bin, f) in [
        ("walnut", "walnut_main"),
        ("walnut-archive", "archive_main"),
        ("walnut-fetch", "fetch_main"),
    ] {
        let text = std::fs::read_to_string(root.join(format!("src/bin/{bin}.rs"))).unwrap();
        let code: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .collect();
        assert_eq!(
            code,
            [
                "fn main() {",
                &format!("std::process::exit(walnut::cli::{f}());"),
                "}"
            ],
            "{bin}"
        );
    }
}
