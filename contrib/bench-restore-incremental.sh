#!/usr/bin/env bash
# bench-restore-incremental.sh -- walnut incremental restore (checksum and lsn mode) against a
# full restore of the same FULL+PAGE chain, beside pgBackRest restore --delta, on PG15.
#   1. initdb -k, archive_command = walnut-archive && pgbackrest archive-push, pgbench -i -s $SCALE
#      (the issue's 1.5 GB: SCALE=100, 1.59 GB restored)
#   2. walnut FULL + pgBackRest full
#   3. the FULL restored and run as a promoted copy (archiving into the same catalog
#      instance with walnut-archive, as after a failover) that changes ~5% of the
#      database's pages (pgbench -t $TX; measured and printed: 5.4% at SCALE=100), stopped
#      cleanly: the "old copy" image
#   4. the source moves on (pgbench -t $SRC_TX, a tenth of TX: "a later PAGE"; SRC_TX=$TX
#      doubles what differs); walnut PAGE + pgBackRest incr
#   5. timed (page cache dropped, wait_quiet before each):
#        walnut_full      walnut restore of the PAGE chain into an empty directory
#        walnut_checksum  walnut restore --incremental-mode checksum over a copy of the image
#        walnut_lsn       walnut restore --incremental-mode lsn over a copy of the image
#        pgbr_full        pgbackrest restore of the incr into an empty directory
#        pgbr_delta       pgbackrest restore --delta over a copy of the image
#      Targets (issue 13): lsn <= 0.2x walnut_full, checksum <= 0.5x walnut_full.
# Run:  bash contrib/bench-restore-incremental.sh  (env: SCALE=100, JOBS=2, PORT=56446, TX,
#       SRC_TX, ROUNDS=3, RI_NAME; QUIET_MAX_WAIT caps the wait for an idle machine before
#       each step). walnut runs stripped (as installed) through setpriv (see below).
#       Measurements before 2026-11-30 16:00 UTC below used SCALE=50, TX=4100 on both sides
#       (14% of the blocks differed), unstripped binaries and runuser.
# Results: $LIMITS_ROOT/results/bench_restore_incremental.tsv
# Also timed: dest_read_deep, the real floor (contrib/deepread.c: 16 readers, 32 MiB pieces,
# 1 MiB reads, WILLNEED 256 MiB ahead); BEFORE_BIN=DIR times the two incremental restores
# with an older build in the same rounds; REUSE=1 reuses the setup of a KEEP=1 run.
# The floor, measured by hand on the old-copy image (851 MB, caches dropped, 2-3 tries each):
# deepread with 2 readers 611-829 ms, 4 readers in 32 MiB pieces 472-497 ms, 16-64 readers
# 472-708 ms, WILLNEED ahead of 2 readers 567-707 ms, each reader hinting its own piece
# 519-646 ms: about four sequential 1 MiB streams are the fastest, hints add nothing; a full
# restore took 1584-1634 ms at the same time, so the floor is about 0.3x.
# Measured 2026-11-30 05:00 UTC (2 vCPU VM shared with 6 other agents, load average 7-9,
# 0-46% idle during every step: very noisy), SCALE=50 = 808 MB restored, TX=4100 each side,
# JOBS=2, release build, REUSE of one setup; both modes wrote 115 MB, lsn kept 84k of 98.6k
# blocks without reading the backup; the lsn result is byte-identical to a full restore.
#   round  full | checksum | lsn  | pgBR full | delta | cold read | deep read | before: cks | lsn
#   1      1712 | 1360     | 942  | 1623      | 2465  | 744       | 593       | 2256        | 1684
#   2      1509 | 1910     | 1181 | 1873      | 1891  | 787       | 493       | 1485        | 1238
#   3      6774*| 1707     | 1459 | 2083      | 2957  | 1178      | 498       | 1314        | 901
#   (* a stall of the machine: round 3's ratios to it are meaningless, the medians drop it)
#   median ratios to walnut full: lsn 0.55x, checksum 0.79x; the previous build (before the
#   deep scan and the overlapped FULL reads) 0.82x and 0.98x in the same rounds; deep read
#   0.33x, find|xargs -P2 cat 0.44x; pgBackRest delta 1.42x its own full (sic: noise).
#   Round by round the new build beat the old one in 2 of 3 rounds for lsn (942 vs 1684,
#   1181 vs 1238, 1459 vs 901) and checksum (1360 vs 2256, 1910 vs 1485, 1707 vs 1314):
#   by the medians of same-round ratios a gain, but not one larger than this machine's
#   noise (hand A/B runs on one image at load 7-9 were as mixed).
# The 0.2x / 0.5x targets are NOT met: both modes read every page of the destination (lsn
# mode checks each kept page's data checksum and LSN, and never skips a whole file unread:
# mtimes prove nothing, and the destination's WAL since the divergence, the only trustworthy
# record of what it changed, is recycled), and that read alone is ~0.3x here. Checksum mode
# then also read every block the chain supplies (no per-block checksums in a backup then:
# see "Block checksums" below): about twice the floor. The rest of lsn mode: random reads of the FULL's blocks for the pages the
# old copy changed (5% of the heap, ~25% of the pkey index), the PAGE's files, 115 MB of
# writes and syncfs.
# Re-run on an IDLE machine after all merges (2026-11-30 05:50 UTC, SCALE=50 = 808 MB, 3
# rounds, 115 MB written by both modes, lsn kept 84k blocks unread): walnut full 1055-1108 ms,
# lsn 875-949 ms (median ratio 0.82x), checksum 1095-1148 ms (1.02x); pgBackRest full
# 1426-1920 ms, delta 1662-1784 ms (1.56x walnut's full); cold read of the destination alone
# 0.42x (find|xargs -P2 cat) and 0.39x (deepread, 4 threads). Idle, the full restore is
# faster and the gain of the incremental modes seen under load (0.55x/0.79x) shrinks: the
# targets (0.2x/0.5x) are not met.
# Block checksums (2026-11-30 07:40 UTC): backups now record a CRC-32C per block (block_crcs),
# so checksum mode reads the destination once and only the ~96 MB of blocks that differ from
# the backups (was: every block the chain supplies). Fresh setup taken with the new build
# (SCALE=50 = 808 MB, 115 MB written, 84.5k of 98.6k blocks kept unread), machine busy
# (load 3-7, other agents), BEFORE_BIN = main's build in the same rounds:
#   round  full | checksum | lsn  | pgBR full | delta | cold read | deep read | before: cks | lsn
#   1      2223 | 2028     | 1703 | 2624      | 2052  | 435       | 439       | 1156        | 1219
#   2      2716 | 893      | 953  | 1525      | 1633  | 456       | 420       | 1151        | 989
#   3      1179 | 832      | 937  | 1593      | 1524  | 473       | 430       | 1229        | 1727
#   median ratios to walnut full: checksum 0.71x (before 0.52x: the full restore's own noise,
#   1.2-2.7 s, swamps these ratios); by absolute medians checksum 893 ms vs 1156 ms before.
# A tighter A/B right after (same setup, caches dropped before each, 5 rounds, load 5.6-6.9):
#   full 1263-1671 ms (median 1386), checksum 753-929 (833), main's checksum 1062-1124
#   (1102), deep read 450-532 (468); median same-round ratios: checksum 0.56x, main's 0.79x,
#   deep read 0.34x. A checksum restore over a destination equal to the backup (nothing to
#   fetch) took 446-480 ms beside a deep read's 372-394 ms: the scan is near the floor; the
#   rest is reading the 96 MB that differ from the backups and writing 115 MB (/usr/bin/time:
#   the new build reads 947 MB in all, the destination's 851 MB and 96 MB of the backups).
# The 0.5x checksum target is NOT met: 0.56x here, against a floor (the destination's cold
# read) of 0.34x; the lsn target (0.2x) is below that floor on this VM.
# Profiled 2026-11-30 10:00-11:00 UTC (same setup rebuilt: SCALE=50, 115 MB written, 84.5k
# blocks kept; RUST_LOG=walnut=debug now prints each phase and each 32 MiB piece's scan and
# fetch times): sync_file_range(WRITE) after each write slept 50-500 ms at a time (blk-wbt
# holds writeback back while the scan reads), so the pkey index's pieces (45% of blocks
# differ) took 415-700 ms to fetch; the ~975 small files ran last, ~10 ms each behind the
# big files' readahead (~100 ms of tail). Changes, each measured (debug timings, A/B runs):
# writeback queued to a thread of its own in 4 MiB batches (index fetch 415-700 -> 117-174
# ms); small files first on 16 threads (the tail -> a 40-50 ms phase at the start; small
# files last, or readahead hints on the big files meanwhile, measured slower); readahead
# hints of adjacent incremental records joined; no POSIX_FADV_SEQUENTIAL on the scanned
# files (its doubled readahead queued the backups' block reads; 6 of 6 A/B pairs faster by
# 10-80 ms in one session, even in another); the chain's block checksums loaded one thread a
# backup (24 -> 12 ms). Tried and dropped: bridging gaps of <= 4 blocks in the backups'
# reads, 2 or 1 scan threads a file, 32 small-file threads, O_DIRECT scan reads (deepread
# with O_DIRECT: 0.55-1.1 s vs 0.45-0.6 s buffered).
# A/B, BEFORE_BIN = main's build, ROUNDS=5 twice (QUIET_MAX_WAIT=30; 96-100% idle before
# every step, load average 0.5-2), first with the first three changes, then with all:
#   round  full | checksum | lsn  | pgBR full | delta | cold read | deep read | before: cks | lsn
#   1      1291 | 728      | 960  | 2011      | 1658  | 460       | 469       | 826         | 1002
#   2      1417 | 711      | 842  | 1746      | 1633  | 498       | 562       | 862         | 1020
#   3      1460 | 744      | 946  | 1973      | 1586  | 492       | 445       | 804         | 1002
#   4      1348 | 711      | 1045 | 1913      | 1696  | 492       | 429       | 957         | 1007
#   5      1359 | 736      | 954  | 1943      | 1743  | 442       | 441       | 844         | 976
#   median ratios: checksum 0.528x (0.502-0.564), main's 0.621x; lsn 0.702x, main's 0.720x
#   1      1326 | 775      | 900  | 2018      | 1834  | 451       | 454       | 908         | 929
#   2      1366 | 719      | 898  | 2058      | 1800  | 508       | 484       | 886         | 961
#   3      1406 | 810      | 963  | 2338      | 1887  | 503       | 543       | 855         | 1008
#   4      1433 | 837      | 886  | 1853      | 1647  | 494       | 454       | 851         | 948
#   5      1435 | 743      | 890  | 1784      | 1659  | 476       | 440       | 863         | 1028
#   median ratios: checksum 0.576x (0.518-0.585), main's 0.608x; lsn 0.657x, main's 0.703x;
#   deep read 0.342x; pgBackRest delta 0.889x its own full, 1.318x walnut's full.
# Over the 10 rounds: checksum 0.535x (median; 2 rounds of 10 at or below 0.51x, none below
# 0.50x), main's 0.615x. (A 6-pair A/B of the two builds right after: medians 841 vs 830
# ms, indistinguishable; the last two changes are kept on their own measurements above.)
# The 0.5x target is NOT met; the remaining time of a ~720-780 ms checksum restore, from the
# debug timings on the quiet machine: ~35 ms process start and catalog (as in a full
# restore), plan 8, block checksums 12, removals and directories 15, small files 40-50;
# the big files ~490-520 ms, reading 750 MB of the destination and ~96 MB of differing
# blocks from the backups at ~1.65 GB/s (deepread: 851 MB at 1.6-2.0 GB/s, so the scan is
# at the device's rate); then syncfs ~100-110 ms writing the 115 MB of scattered 8 KiB
# blocks (14k). Those writes cannot hide under the scan on this VM: 14k random 8 KiB writes
# alone took 215 ms buffered + fsync (337 ms O_DIRECT on 16 threads); started during a
# deepread they slowed it from 0.45-0.55 s to 0.66-0.73 s and themselves to 0.6-1.0 s.
# Floor of this design: deep read 0.32-0.39x + writes ~0.08x + fixed ~0.08x = 0.48-0.55x.
# wal-index route (2026-11-30 13:20-13:50 UTC): the old copy now archives into the same
# catalog instance (walnut-archive; the realistic failover), so lsn mode takes the wal-index
# route: the blocks the copy's WAL index names after the divergence (7.6k: 4 archived
# segment indexes + its last segment decoded from pg_wal) are written from the FULL, the
# PAGE's blocks are written, both without reading the destination, and the other 84.1k of
# 98.6k blocks are kept unread: 4.2 MB of the 851 MB destination read (VM, FSM and small
# non-relation files), 115 MB written, the result byte-identical to a full restore (diff -r).
# Reading the FULL's changed blocks run by run, not in spans bridging gaps of 16 blocks
# (5% of pages changed at random made those spans cover most of pgbench_accounts), took the
# big files from ~350 to ~170 ms. Same setup (REUSE), 3 rounds, machine quiet at the end
# (load 2 -> 0), release build:
#   round  full | checksum | lsn | pgBR full | delta | cold read | deep read
#   1      1221 | 747      | 410 | 1914      | 1894  | 531       | 491
#   2      1470 | 781      | 457 | 2114      | 2014  | 487       | 450
#   3      1193 | 672      | 450 | 1760      | 1805  | 507       | 459
#   median ratios to walnut full: lsn 0.336x (0.311-0.377), checksum 0.563x; cold read of
#   the destination alone 0.425x, deep read 0.385x: lsn mode is now below the read floor
#   of every scanning design. Before the run-by-run reads (same setup, busier machine):
#   lsn 0.37x (622-738 ms); before the wal-index route (page scan of the same image) 0.66x.
# On main after the merge (14:40 UTC, release build with one codegen unit, quiet machine, 3
# rounds): full 1758 / 1155 / 1121 ms, checksum 770 / 698 / 659, lsn 644 / 371 / 364 (route
# wal-index each time, 84.0k blocks kept unread, 4.2 MB of the destination read): medians
# lsn 0.324x, checksum 0.588x, cold read 0.403x, deep read 0.354x.
# The 0.2x target is NOT met: from RUST_LOG=walnut=debug, of ~400 ms: ~35 ms start-up and
# plan (the route decision included: 16 MiB of the copy's pg_wal decoded), ~30 ms removals,
# ~60-90 ms the ~975 small files (a cold stat and open each), ~170 ms the big files
# (62 MB of the FULL's scattered blocks read, 115 MB written), ~90 ms the final syncfs of
# 14k scattered 8 KiB blocks. The writes alone (~0.08x here) and the fixed part (~0.1x)
# leave no room for 0.2x on this VM with 10% of the data changed in all.
# At the issue's size and change (2026-11-30 16:30 UTC, quiet machine, 7 rounds, REUSE of
# one setup: SCALE=100 = 1.59 GB restored, the old copy's WAL names 10.5k blocks = 5.4% of
# 194k, 5.9% of the bytes written; BEFORE_BIN = main's build, stripped, same rounds):
#   round  full | checksum | lsn | pgBR full | delta | cold read | deep read | before: cks | lsn
#   1      1909 | 960      | 327 | 2718      | 3604  | 879       | 738       | 1037        | 384
#   2      1690 | 977      | 346 | 2721      | 2991  | 725       | 700       | 1107        | 351
#   3      1736 | 955      | 325 | 2759      | 2698  | 718       | 675       | 989         | 356
#   4      1665 | 924      | 321 | 2814      | 3473  | 773       | 727       | 1041        | 363
#   5      1587 | 954      | 344 | 2481      | 3380  | 802       | 672       | 1151        | 409
#   6      1760 | 990      | 347 | 2609      | 3098  | 766       | 720       | 1014        | 339
#   7      1742 | 923      | 346 | 2393      | 2852  | 753       | 708       | 982         | 345
#   median same-round ratios to walnut full: lsn 0.197x (0.171-0.217), main's build 0.205x;
#   checksum 0.555x, main's 0.576x; cold read of the destination 0.435x, deep read 0.409x;
#   pgBackRest delta 1.19x its own full, 1.77x walnut's full (lsn mode 9.0x faster than it, by medians).
# The same with the source changing as much as the copy (RI_NAME=ri100x SRC_TX=5500: 10.2%
# of the bytes written, 3 rounds): lsn 0.245x (426-488 ms against 1.84-2.00 s), checksum
# 0.587x, deep read 0.346x.
# What the new build changed in lsn mode's wal-index route (RUST_LOG=walnut=debug phases,
# SCALE=100): files the index does not name, that no newer backup holds a block of and whose
# length is right, are kept without opening them or any stored file (the ~975 small files:
# 43 -> 27 ms); the segment holding the shutdown checkpoint is read only as far as its WAL
# goes (planning 24 -> 10 ms: it read 16 MiB cold); the destination's extra files (its old
# WAL segments: 128 MiB of unlinks, 20 ms) are removed beside the big files, and the small
# files run beside them too (4 A/B pairs: ~8 ms less). Tried and dropped: reading the FULL's
# blocks across gaps of up to 3 blocks (4 A/B pairs: no gain).
# The floor: the lsn restore's ~10.5k random 8 KiB reads of the FULL and ~10k scattered
# writes; this disk gives 57-69k random 8 KiB reads a second (32-128 threads of preads, or
# WILLNEED hints), so those alone take ~300 ms of the ~330. Checksum mode must read the
# whole destination (the mode compares every block): that read alone is 0.41-0.44x of a
# full restore here, its ~94 MB of scattered writes ~0.05x more (syncfs 90-100 ms), and
# start-up, plan and block checksums ~0.035x: its 0.5x target is below this VM's floor.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${BENCH:=$REPO/../shared/bench}"
. "$BENCH/common.sh"
: "${SCALE:=100}" "${JOBS:=2}" "${PORT:=56446}" "${ROUNDS:=3}"
# the old copy changes ~5% of the database's pages (pgbench -t TX: each transaction changes a
# random page of pgbench_accounts, and often a leaf of its primary key); the source moves on
# by SRC_TX transactions before the PAGE ("a later PAGE"; SRC_TX=$TX doubles what differs)
: "${TX:=$(( SCALE * 55 ))}"
: "${SRC_TX:=$(( TX / 10 ))}"
mkdir -p "$RESULTS_DIR"
RESULTS_FILE=$RESULTS_DIR/bench_restore_incremental.tsv; : > "$RESULTS_FILE"
# RI_NAME: the setup's directory below LIMITS_ROOT (one per scale by default)
: "${RI_NAME:=ri$SCALE}"
B=$PG15_BIN; P=$LIMITS_ROOT/pg15$RI_NAME; X=$LIMITS_ROOT/$RI_NAME; CAT=$X/cat
PGBR_DIR=$X/pgbr; CONF=$PGBR_DIR/pgbackrest.conf

(cd "$REPO" && cargo build --release -q)
BIN=$LIMITS_ROOT/walnut-bin-ri
mkdir -p "$BIN"
cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
# stripped, as contrib/install.sh installs them (the debug information made each cold start
# ~13 ms slower, a constant in every walnut step)
strip "$BIN"/* 2>/dev/null || echo "(warn: strip failed; binaries keep their debug information)" >&2
chmod 755 "$BIN" "$BIN"/*
# walnut runs as the postgres OS user through setpriv: runuser's PAM session cost ~16 ms cold
# in every step (pgBackRest's steps keep as_pg: it needs the login environment)
RUNPG=(setpriv --reuid="$PG_OS_USER" --regid="$PG_OS_USER" --init-groups)

# REUSE=1: keep the catalog, the old-copy image and the backups of an earlier run (KEEP=1)
if [ -n "${REUSE:-}" ] && [ -f "$X/ids" ] && [ -d "$X/image" ]; then
  read -r FULL PAGE < "$X/ids"
  W() { "${RUNPG[@]}" "$BIN/walnut" "$@"; }
  PGBR="$PGBACKREST --config=$CONF --stanza=ri"
else
pg_stop "$B" "$P"
for d in "$X"/copy "$X"/r-*; do [ -d "$d" ] && pg_stop "$B" "$d"; done
rm -rf "$P" "$X"; mkdir -p "$P" "$X" "$PGBR_DIR"/{repo,log,lock,spool} "$SOCK_DIR"
chown -R "$PG_OS_USER:" "$P" "$X" "$SOCK_DIR"
pgx "$B" initdb -k -D "$P" -A trust -U postgres >/dev/null
W() { "${RUNPG[@]}" "$BIN/walnut" "$@"; }
W init -B "$CAT"
W add-instance -B "$CAT" --instance bench -D "$P"
cat > "$CONF" <<CONF
[global]
repo1-path=$PGBR_DIR/repo
log-path=$PGBR_DIR/log
lock-path=$PGBR_DIR/lock
spool-path=$PGBR_DIR/spool
log-level-console=warn
start-fast=y
repo1-retention-full=5
[ri]
pg1-path=$P
pg1-socket-path=$SOCK_DIR
pg1-port=$PORT
CONF
chown -R "$PG_OS_USER:" "$PGBR_DIR"
PGBR="$PGBACKREST --config=$CONF --stanza=ri"
cat >> "$P/postgresql.conf" <<CONF
wal_level = replica
archive_mode = on
archive_command = '$BIN/walnut-archive -B $CAT --instance bench %p %f && $PGBR archive-push %p'
max_wal_size = 4GB
CONF
pg_start "$B" "$P" "$PORT"
q() { psqlq "$B" "$PORT" "$1"; }
CONN=(-h "$SOCK_DIR" -p "$PORT" -U postgres)
as_pg $PGBR stanza-create >/dev/null
pgx "$B" pgbench "${CONN[@]}" -i -s "$SCALE" -q postgres > "$X/init.log" 2>&1
q "checkpoint" >/dev/null

FULL=$(W backup -B "$CAT" --instance bench -b full -j "$JOBS" "${CONN[@]}" 2> "$X/full.log")
as_pg $PGBR --type=full --process-max="$JOBS" --compress-type=none backup

# the old copy: restored FULL, promoted, ~5% changed, stopped cleanly
W restore -B "$CAT" --instance bench -i "$FULL" -D "$X/copy" -j "$JOBS" \
  --recovery-target immediate --recovery-target-action promote 2> "$X/copy-restore.log"
# the old copy archives into the same catalog instance (walnut-archive only; pgBackRest's
# stanza is the source's): lsn mode's wal-index route then knows what it changed
echo "archive_command = '$BIN/walnut-archive -B $CAT --instance bench %p %f'" >> "$X/copy/postgresql.auto.conf"
CPORT=$((PORT + 1))
pg_start "$B" "$X/copy" "$CPORT"
until [ "$(psqlq "$B" "$CPORT" "select pg_is_in_recovery()")" = f ]; do sleep 0.2; done
pgx "$B" pgbench -h "$SOCK_DIR" -p "$CPORT" -U postgres -n -t "$TX" postgres > "$X/copy-run.log" 2>&1
pg_stop "$B" "$X/copy"
mv "$X/copy" "$X/image"

# the source moves on
pgx "$B" pgbench "${CONN[@]}" -n -t "$SRC_TX" postgres > "$X/run.log" 2>&1
PAGE=$(W backup -B "$CAT" --instance bench -b page -j "$JOBS" "${CONN[@]}" 2> "$X/page.log")
as_pg $PGBR --type=incr --process-max="$JOBS" --compress-type=none backup
q "select pg_switch_wal()" >/dev/null
sleep 2
pg_stop "$B" "$P"
echo "$FULL $PAGE" > "$X/ids"
fi

image() { rm -rf "$1"; cp -a "$X/image" "$1"; sync; }
timed() { # NAME CMD...
  local name=$1; shift
  wait_quiet; drop_caches
  local t; t=$(now_ns)
  "$@" > "$X/$name.out" 2> "$X/$name.log" || { echo "$name FAILED:" >&2; tail -5 "$X/$name.log" >&2; exit 1; }
  sync
  local ms; ms=$(elapsed_ms "$t")
  report1 "${name}_ms" "$ms" ms >&2
  echo "$ms"
}
# ROUNDS rounds of the five steps; each restored directory is removed once timed (disk)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f\n", a/b}'; }
med() { stats | cut -d' ' -f1; }
rm -rf "$X/rounds"; mkdir -p "$X/rounds"
cc -O2 -pthread -o "$X/deepread" "$HERE/deepread.c"
for r in $(seq 1 "$ROUNDS"); do
  FULL_MS=$(timed walnut_full W restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/r-full" -j "$JOBS")
  rm -rf "$X/r-full"
  image "$X/r-cks"
  CKS_MS=$(timed walnut_checksum W restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/r-cks" -j "$JOBS" --incremental-mode checksum)
  rm -rf "$X/r-cks"
  image "$X/r-lsn"
  LSN_MS=$(timed walnut_lsn W restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/r-lsn" -j "$JOBS" --incremental-mode lsn)
  rm -rf "$X/r-lsn"
  cat "$X/walnut_checksum.out" "$X/walnut_lsn.out"
  # what differs: the blocks the old copy's WAL names, and all written, as shares of the total
  CHG=$(sed -n 's/.* names .* and \([0-9]*\) blocks changed .*/\1/p' "$X/walnut_lsn.log" | head -1)
  read -r WR TOT < <(sed -n 's/.*: \([0-9]*\) of \([0-9]*\) bytes written.*/\1 \2/p' "$X/walnut_lsn.out" | head -1) || true
  [ -n "$CHG" ] && [ -n "${TOT:-}" ] && awk -v c="$CHG" -v w="$WR" -v t="$TOT" 'BEGIN {
    printf "changed by the old copy: %d blocks = %.1f%% of the %d restored; written %.1f%%\n", c, 100 * c * 8192 / t, t / 8192, 100 * w / t }' >&2
  rm -rf "$X/r-pgbr"; mkdir -p "$X/r-pgbr"; chown "$PG_OS_USER:" "$X/r-pgbr"; chmod 700 "$X/r-pgbr"
  PF_MS=$(timed pgbr_full as_pg $PGBR --pg1-path="$X/r-pgbr" --process-max="$JOBS" restore)
  rm -rf "$X/r-pgbr"
  image "$X/r-delta"
  PD_MS=$(timed pgbr_delta as_pg $PGBR --pg1-path="$X/r-delta" --process-max="$JOBS" --delta restore)
  rm -rf "$X/r-delta"
  # the floor of both modes: reading the destination cold, JOBS readers
  image "$X/r-read"
  RD_MS=$(timed dest_read_cold sh -c "find '$X/r-read' -type f -print0 | xargs -0 -P$JOBS -n20 cat > /dev/null")
  rm -rf "$X/r-read"
  # the real floor: the same read with deep parallelism (16 readers, WILLNEED 256 MiB ahead)
  image "$X/r-read"
  RDD_MS=$(timed dest_read_deep "$X/deepread" "$X/r-read" 16 256 1024)
  rm -rf "$X/r-read"
  # BEFORE_BIN: the same two incremental restores with an older build, in the same round
  BC_MS=- BL_MS=-
  if [ -n "${BEFORE_BIN:-}" ]; then
    WB() { "${RUNPG[@]}" "$BEFORE_BIN/walnut" "$@"; }
    image "$X/r-cks"
    BC_MS=$(timed before_checksum WB restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/r-cks" -j "$JOBS" --incremental-mode checksum)
    rm -rf "$X/r-cks"
    image "$X/r-lsn"
    BL_MS=$(timed before_lsn WB restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/r-lsn" -j "$JOBS" --incremental-mode lsn)
    rm -rf "$X/r-lsn"
    echo "$(ratio "$BL_MS" "$FULL_MS")" >> "$X/rounds/blsn"
    echo "$(ratio "$BC_MS" "$FULL_MS")" >> "$X/rounds/bcks"
  fi
  echo "$(ratio "$RDD_MS" "$FULL_MS")" >> "$X/rounds/rdd"
  echo "$r $FULL_MS $CKS_MS $LSN_MS $PF_MS $PD_MS $RD_MS $RDD_MS $BC_MS $BL_MS" >> "$X/rounds/all"
  echo "$(ratio "$RD_MS" "$FULL_MS")" >> "$X/rounds/rd"
  echo "$(ratio "$LSN_MS" "$FULL_MS")" >> "$X/rounds/lsn"
  echo "$(ratio "$CKS_MS" "$FULL_MS")" >> "$X/rounds/cks"
  echo "$(ratio "$PD_MS" "$PF_MS")" >> "$X/rounds/pd_pf"
  echo "$(ratio "$PD_MS" "$FULL_MS")" >> "$X/rounds/pd_wf"
done
echo "round walnut_full checksum lsn pgbr_full pgbr_delta dest_read_cold dest_read_deep before_checksum before_lsn (ms)"; cat "$X/rounds/all"
# medians of the same-round ratios
report1 ratio_lsn_to_full "$(med < "$X/rounds/lsn")" x
report1 ratio_checksum_to_full "$(med < "$X/rounds/cks")" x
report1 ratio_pgbr_delta_to_pgbr_full "$(med < "$X/rounds/pd_pf")" x
report1 ratio_pgbr_delta_to_walnut_full "$(med < "$X/rounds/pd_wf")" x
report1 ratio_dest_read_cold_to_full "$(med < "$X/rounds/rd")" x
report1 ratio_dest_read_deep_to_full "$(med < "$X/rounds/rdd")" x
if [ -n "${BEFORE_BIN:-}" ]; then
  report1 ratio_before_lsn_to_full "$(med < "$X/rounds/blsn")" x
  report1 ratio_before_checksum_to_full "$(med < "$X/rounds/bcks")" x
fi
cat "$RESULTS_FILE"
[ -n "${KEEP:-}" ] || rm -rf "$X"/r-* "$X/image"
