//! Progress reporting. The library never prints: it reports through a [`Progress`] handle
//! that the binary chooses: an `indicatif` bar on a terminal, log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    total: u64,
    done: AtomicU64,
    last_log: Mutex<Instant>,
}

impl Progress {
    /// A progress handle for `total` units (bytes) of `what`.
    pub fn new(what: &str, total: u64) -> Progress {
        let bar = if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(what.to_string());
            Some(b)
        } else {
            None
        };
        Progress {
            bar,
            what: what.to_string(),
            total,
            done: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        }
    }

    /// A handle that reports nothing.
    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            what: String::new(),
            total: 0,
            done: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        }
    }

    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if !self.what.is_empty() {
            if let Ok(mut last) = self.last_log.try_lock() {
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    log::info!("{}: {} of {} MiB", self.what, done >> 20, self.total >> 20);
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
