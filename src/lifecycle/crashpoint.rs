//! Test hook for crash tests: with `WALNUT_TEST_KILL_AT=N` the process sends itself
//! SIGKILL at the Nth [`hit`] (each is just before a catalog write or delete of a
//! lifecycle command), as a power cut or `kill -9` would stop it. Unset: nothing happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const KILL_ENV: &str = "WALNUT_TEST_KILL_AT";

static COUNT: AtomicU64 = AtomicU64::new(0);
static AT: OnceLock<Option<u64>> = OnceLock::new();

fn at() -> Option<u64> {
    *AT.get_or_init(|| std::env::var(KILL_ENV).ok().and_then(|s| s.parse().ok()))
}

/// Whether a kill is armed: callers then remove objects one by one (each a crash point)
/// instead of in batches.
pub fn armed() -> bool {
    at().is_some()
}

/// Counts one crash point; `what` names it in the log line written before the kill.
pub fn hit(what: &str) {
    let Some(at) = at() else {
        return;
    };
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    if n == at {
        log::warn!("{KILL_ENV}={at}: SIGKILL before {what}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
