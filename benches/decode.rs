//! Decode+index speed per 16 MiB segment, beside `pg_waldump -q` on the same files.
//!
//! `cargo bench --bench decode -- CORPUS_DIR` (contrib/bench-decode.sh builds a corpus).
//! Env: `PG_WALDUMP` (default /usr/lib/postgresql/15/bin/pg_waldump), `REPEAT` (7).
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use walnut::index::build::StreamIndexer;
use walnut::WalFileName;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("WALNUT_WAL_CORPUS").map(PathBuf::from));
    let Some(dir) = dir else {
        eprintln!("usage: cargo bench --bench decode -- CORPUS_DIR (see contrib/bench-decode.sh)");
        return;
    };
    let waldump = std::env::var_os("PG_WALDUMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin/pg_waldump"));
    let repeat: usize = std::env::var("REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
        .max(1);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read corpus dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<WalFileName>().ok())
                .is_some_and(|n| n.is_segment())
        })
        .collect();
    paths.sort();
    let files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let seg_size = files.first().map_or(0, |f| f.len());
    println!(
        "{} segments of {} MiB from {}, {repeat} runs each; walnut in-process single-threaded",
        files.len(),
        seg_size >> 20,
        dir.display()
    );
    println!(
        "{:<26} {:>8} {:>10} {:>11} {:>8} {:>14} {:>7}",
        "segment", "records", "walnut ms", "(decode ms)", "GB/s", "pg_waldump ms", "ratio"
    );
    let (mut ours_all, mut theirs_all) = (Vec::new(), Vec::new());
    let mut faster = 0;
    let mut best = f64::MAX;
    for (i, p) in paths.iter().enumerate() {
        let name: WalFileName = p.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let segno = name.segno(seg_size as u32).unwrap();
        let mut times = Vec::new();
        let mut records = 0;
        for _ in 0..repeat {
            let t = Instant::now();
            let mut ix = StreamIndexer::new(name.tli());
            ix.stop_after(segno);
            ix.feed_segment(segno, &files[i]).unwrap();
            let mut k = i + 1;
            while ix.partial_record_segno() == Some(segno) && k < files.len() {
                ix.feed_segment(segno + (k - i) as u64, &files[k]).unwrap();
                k += 1;
            }
            let idx = ix.finish().unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            records = idx[0].records;
        }
        let mut dec_only = Vec::new();
        for _ in 0..repeat {
            let t = Instant::now();
            let mut d = walnut::wal::WalStreamDecoder::new(walnut::Lsn(segno * seg_size as u64));
            let mut n = 0u64;
            d.decode_all(&files[i], |r| {
                n += r.blocks.len() as u64;
                Ok(true)
            })
            .unwrap();
            std::hint::black_box(n);
            dec_only.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut dump = Vec::new();
        for _ in 0..repeat {
            let t = Instant::now();
            let _ = Command::new(&waldump)
                .arg("-q")
                .arg(p)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            dump.push(t.elapsed().as_secs_f64() * 1e3);
        }
        best = best.min(times.iter().cloned().fold(f64::MAX, f64::min));
        let (ours, theirs) = (median(&mut times), median(&mut dump));
        if ours < theirs {
            faster += 1;
        }
        println!(
            "{:<26} {:>8} {:>10.2} {:>11.2} {:>8.2} {:>14.2} {:>6.1}x",
            p.file_name().unwrap().to_string_lossy(),
            records,
            ours,
            median(&mut dec_only),
            seg_size as f64 / ours / 1e6,
            theirs,
            theirs / ours
        );
        ours_all.push(ours);
        theirs_all.push(theirs);
    }
    if ours_all.is_empty() {
        return;
    }
    let (mo, mt) = (median(&mut ours_all), median(&mut theirs_all));
    let worst = ours_all.iter().cloned().fold(0.0, f64::max);
    println!(
        "median: walnut {mo:.2} ms/segment ({:.2} GB/s; slowest {worst:.2} ms = {:.2} GB/s), pg_waldump -q {mt:.2} ms; walnut faster on {faster}/{} segments",
        seg_size as f64 / mo / 1e6,
        seg_size as f64 / worst / 1e6,
        paths.len()
    );
    println!("fastest single walnut run: {best:.2} ms");
}
