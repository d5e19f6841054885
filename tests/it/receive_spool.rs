//! `walnut receive --spool-dir` outside the catalog: the receiver records its spool in the
//! archive (`.receive-spool`), and walnut-fetch serves the segment being filled from there
//! during a real recovery: a synchronous receiver, the primary crashed with `-m immediate`,
//! a restore to "latest" has every acknowledged commit (the tail is only in that spool).

#[test]
fn receive_spool_elsewhere_serves_the_tail_to_recovery() {
    super::receive::crash_scenario_in("recv-own-spool", true, true);
}
