//! Progress reporting. The library never prints: it reports through a [`Progress`] handle
//! its caller injects (the cli's is an `indicatif` bar on a terminal, log lines otherwise).

/// Where a long operation reports how far it got. Called from several copy threads.
pub trait Progress: Send + Sync {
    /// A new operation of `total` units (bytes) named `what` begins.
    fn start(&self, what: &str, total: u64);
    /// `n` more units are done.
    fn inc(&self, n: u64);
    /// The operation ended.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn inc(&self, _: u64) {}
    fn finish(&self) {}
}
