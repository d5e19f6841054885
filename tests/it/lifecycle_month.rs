//! A simulated month against real PostgreSQL 15 (1 MiB segments, a small database): a FULL
//! every "week" and a PAGE or DELTA every "day", the backup clock moved a day per step by
//! the test hook WALNUT_TEST_CLOCK_OFFSET. After each step every policy's own catalog
//! receives the new backups and WAL and runs `delete --expired --delete-wal`:
//! - the backups deleted and kept, and the WAL objects left, are exactly those an
//!   independent model of the rules names;
//! - `show --archive` reports no gap inside any kept backup's window;
//! - catalog disk use stays bounded;
//! - restores (a sample, to keep the test fast: the oldest kept backup of each policy on
//!   day 13; on day 27 the oldest, a middle one and the newest to "latest") give the
//!   primary's pg_dumpall at each backup's restore point (at its consistency point when
//!   the policy keeps only its start-stop WAL).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::env::*;
use super::harness::*;
use super::lifecycle_util::*;

const DAY: i64 = 86400;

#[derive(Clone, Debug)]
struct B {
    id: String,
    full: bool,
    start: u64,
    stop: u64,
    rt: i64,
}

struct Policy {
    name: &'static str,
    redundancy: Option<usize>,
    window: Option<i64>,
    wal_depth: Option<usize>,
    cat: PathBuf,
    /// disk use after each day
    disk: Vec<u64>,
}

impl Policy {
    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(n) = self.redundancy {
            a.extend(["--retention-redundancy".to_string(), n.to_string()]);
        }
        if let Some(n) = self.window {
            a.extend(["--retention-window".to_string(), n.to_string()]);
        }
        if let Some(n) = self.wal_depth {
            a.extend(["--wal-depth".to_string(), n.to_string()]);
        }
        a
    }

    /// The model: the index of the first kept backup of `all` (oldest first) at `now`.
    fn boundary(&self, all: &[B], now: i64) -> usize {
        let fulls: Vec<usize> = (0..all.len()).filter(|&i| all[i].full).collect();
        let red = self.redundancy.map(|n| {
            if fulls.len() < n {
                0
            } else {
                fulls[fulls.len() - n]
            }
        });
        let win = self.window.map(|d| {
            fulls
                .iter()
                .rev()
                .find(|&&i| all[i].rt <= now - d * DAY)
                .copied()
                .unwrap_or(0)
        });
        match (red, win) {
            (Some(r), Some(w)) => r.min(w),
            (Some(r), None) => r,
            (None, Some(w)) => w,
            (None, None) => unreachable!(),
        }
    }

    /// The model's WAL: whether segment `s` stays, for the kept backups `kept`; `None`
    /// when nothing may be purged.
    fn anchor(&self, all: &[B], kept: &[B]) -> Option<usize> {
        if let Some(n) = self.redundancy {
            if all.iter().filter(|b| b.full).count() < n {
                return None;
            }
        }
        match self.wal_depth {
            Some(n) if kept.len() < n => None,
            Some(n) => Some(kept.len() - n),
            None => Some(0),
        }
    }
}

fn wal_objects(cat: &Path) -> BTreeSet<String> {
    std::fs::read_dir(cat.join("instances/db/wal/00000001"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn a_simulated_month_under_each_policy_keeps_exactly_what_the_rules_name() {
    let env = Env::new("life-month");
    let pg = &env.pg;
    pg.psql(
        "postgres",
        "create table t(i int primary key, day int, pad text); insert into t select g, 0, md5(g::text) from generate_series(1, 2000) g",
    );
    env.switch_and_wait(pg);
    let mut policies: Vec<Policy> = [
        ("redundancy", Some(2), None, None),
        ("window", None, Some(7), None),
        ("both", Some(1), Some(9), None),
        ("wal-depth", Some(2), None, Some(3)),
    ]
    .into_iter()
    .map(|(name, redundancy, window, wal_depth)| Policy {
        name,
        redundancy,
        window,
        wal_depth,
        cat: copy_catalog(&env.cat, &env.path(&format!("cat-{name}"))),
        disk: Vec::new(),
    })
    .collect();
    let mut seen = files(&env.cat);
    let mut all: Vec<B> = Vec::new();
    let mut dumps: BTreeMap<String, String> = BTreeMap::new();
    for day in 0..28i64 {
        pg.psql(
            "postgres",
            &format!(
                "update t set day = {day}, pad = md5(pad) where i % 11 = {}; insert into t select g, {day}, 'n' from generate_series({}, {}) g",
                day % 11,
                100_000 + day * 50,
                100_000 + day * 50 + 49
            ),
        );
        env.switch_and_wait(pg);
        let mode = if day % 7 == 0 {
            "full"
        } else if day % 2 == 1 {
            "page"
        } else {
            "delta"
        };
        let offset = vec![("WALNUT_TEST_CLOCK_OFFSET", (day * DAY).to_string())];
        let args = env.backup_args_on(pg, mode, &["-j", "2"]);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = ok(walnut_env(&a, &offset), &format!("day {day} {mode}"))
            .trim()
            .to_string();
        pg.psql(
            "postgres",
            &format!("select pg_create_restore_point('rp_{id}')"),
        );
        dumps.insert(id.clone(), Env::dumpall(pg));
        env.switch_and_wait(pg);
        let row = env.row(&id);
        assert_eq!(row["status"], "OK");
        all.push(B {
            id: id.clone(),
            full: mode == "full",
            start: lsn(row["start_lsn"].as_str().unwrap()),
            stop: lsn(row["stop_lsn"].as_str().unwrap()),
            rt: walnut::backup::meta::parse_time(row["recovery_time"].as_str().unwrap()).unwrap(),
        });
        let real_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (all.last().unwrap().rt - day * DAY - real_now).abs() < 600,
            "the backup clock did not move by {day} days: {row}"
        );
        // the new files of the day go to every policy's catalog
        let now_files = files(&env.cat);
        let new: BTreeSet<String> = now_files.difference(&seen).cloned().collect();
        seen = now_files;
        let now = walnut::backup::meta::parse_time(row["recovery_time"].as_str().unwrap()).unwrap()
            + 3600;
        for p in &mut policies {
            copy_files(&env.cat, &p.cat, &new);
            let before_ids: Vec<String> = statuses(&p.cat).into_iter().map(|(i, _)| i).collect();
            let before_wal = wal_objects(&p.cat);
            let mut args = vec![
                "delete".to_string(),
                "-B".into(),
                p.cat.to_str().unwrap().into(),
                "--instance".into(),
                "db".into(),
                "--expired".into(),
                "--delete-wal".into(),
                "--format".into(),
                "json".into(),
            ];
            args.extend(p.args());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let clock = vec![("WALNUT_TEST_CLOCK_OFFSET", (day * DAY + 3600).to_string())];
            let r = json(
                walnut_env(&a, &clock),
                &format!("day {day}: delete ({})", p.name),
            );
            // backups: exactly the model's
            let first = p.boundary(&all, now);
            let kept: Vec<B> = all[first..].to_vec();
            let want_ids: Vec<String> = kept.iter().map(|b| b.id.clone()).collect();
            let ids: Vec<String> = statuses(&p.cat).into_iter().map(|(i, _)| i).collect();
            assert_eq!(ids, want_ids, "day {day} ({}): kept backups\n{r}", p.name);
            let mut want_deleted: Vec<String> = before_ids
                .iter()
                .filter(|i| !want_ids.contains(i))
                .cloned()
                .collect();
            want_deleted.reverse();
            assert_eq!(
                r["deleted"],
                serde_json::json!(want_deleted),
                "day {day} ({})",
                p.name
            );
            // WAL: exactly what the model keeps
            let anchor = p.anchor(&all, &kept);
            let keeps = |s: u64| match anchor {
                None => true,
                Some(a) => {
                    s >= seg(kept[a].start)
                        || kept.iter().any(|b| s >= seg(b.start) && s <= seg(b.stop))
                }
            };
            let want_wal: BTreeSet<String> = before_wal
                .iter()
                .filter(|n| seg_of(n).is_none_or(|(_, s)| keeps(s)))
                .cloned()
                .collect();
            let got_wal = wal_objects(&p.cat);
            assert_eq!(
                got_wal.symmetric_difference(&want_wal).collect::<Vec<_>>(),
                Vec::<&String>::new(),
                "day {day} ({}): WAL left differs from the model (anchor {anchor:?})\n{r}",
                p.name
            );
            if anchor.is_none() {
                assert!(r["wal_skipped"].is_string(), "{r}");
            }
            // no gap inside a kept backup's window
            let ar = json(
                walnut(&[
                    "show",
                    "-B",
                    p.cat.to_str().unwrap(),
                    "--instance",
                    "db",
                    "--archive",
                    "--format",
                    "json",
                ]),
                "show --archive",
            );
            let last = got_wal
                .iter()
                .filter_map(|n| seg_of(n))
                .map(|(_, s)| s)
                .max()
                .unwrap();
            for t in ar["timelines"].as_array().unwrap() {
                for g in t["gaps"].as_array().unwrap() {
                    let (a, b) = (
                        seg_of(g[0].as_str().unwrap()).unwrap().1,
                        seg_of(g[1].as_str().unwrap()).unwrap().1,
                    );
                    for (i, k) in kept.iter().enumerate() {
                        let end = if anchor.is_some_and(|x| i >= x) || anchor.is_none() {
                            last
                        } else {
                            seg(k.stop)
                        };
                        assert!(
                            b < seg(k.start) || a > end,
                            "day {day} ({}): gap {g} inside the window of {}",
                            p.name,
                            k.id
                        );
                    }
                }
            }
            p.disk.push(disk_use(&p.cat));
            // restores, a sample
            let sample: Vec<usize> = match day {
                13 => vec![0],
                27 => vec![0, kept.len() / 2, kept.len() - 1],
                _ => vec![],
            };
            for i in sample {
                let b = &kept[i];
                let pitr = anchor.is_none_or(|a| i >= a);
                let target = if i == kept.len() - 1 && day == 27 {
                    "latest".to_string()
                } else if pitr {
                    format!("rp_{}", b.id)
                } else {
                    "immediate".to_string()
                };
                let d = restore_dump(
                    &env,
                    &p.cat,
                    &b.id,
                    &target,
                    &format!("r-{}-{day}-{i}", p.name),
                );
                same_dump(
                    &d,
                    &dumps[&b.id],
                    &format!("day {day} ({}): {} to {target}", p.name, b.id),
                );
            }
        }
    }
    // disk use stays bounded: the last week's peak is well below the whole month's catalog
    // and not above the third week's peak by more than a week's growth
    let master = disk_use(&env.cat);
    for p in &policies {
        let week3 = *p.disk[14..21].iter().max().unwrap();
        let week4 = *p.disk[21..28].iter().max().unwrap();
        eprintln!(
            "{}: disk use week 3 {week3} B, week 4 {week4} B, whole month (nothing deleted) {master} B",
            p.name
        );
        assert!(week4 < master * 7 / 10, "{}: {week4} of {master}", p.name);
        assert!(week4 <= week3 * 3 / 2, "{}: {week4} after {week3}", p.name);
        let _ = std::fs::remove_dir_all(&p.cat);
    }
}
