#!/usr/bin/env bash
# bench-backup.sh -- walnut FULL / PAGE backup and FULL+PAGE restore on a pgbench database
# (PG15, initdb -k, archive_command = walnut-archive), timed like /work/shared/bench/04_backup.sh
# (page cache dropped before each timed step, wait_quiet), with the same reference points:
#   copy_cp_a            cp -a of the stopped data dir (physical copy limit)
#   walnut_full          walnut backup -b full -j $JOBS
#   changed blocks       blockdiff.py between the cp -a snapshot and the data dir after
#                        pgbench -c 4 -T $INCR_SECONDS (what a page-level incremental must copy)
#   walnut_page          walnut backup -b page -j $JOBS: time, stored bytes, pages stored
#   walnut_restore       walnut restore of FULL+PAGE into an empty dir, -j $JOBS
# PostgreSQL 18's pg_basebackup --incremental and pg_combinebackup figures come from
# 05_pg18_incremental.sh (same scale and pgbench window; see the bench README).
# Run:  bash contrib/bench-backup.sh   (env: SCALE=100, INCR_SECONDS=30, JOBS=2, PORT=56436)
# Results: $LIMITS_ROOT/results/bench_backup.tsv
# Measured once (2026-11-23, 2 vCPU VM, SCALE=100, -T 30, JOBS=2; data dir 1517 MiB w/o pg_wal):
#   cp -a (whole data dir incl. pg_wal) 3.26 s, 890 MB/s | walnut FULL 2.45 s, 649 MB/s
#   changed blocks (blockdiff) 103,299 = 807 MiB | walnut PAGE 2.26 s, 811 MiB stored
#   (103,267 pages + 4.2 MiB whole files), 1.006x the changed-block volume
#   walnut restore FULL+PAGE 3.25 s (1532 MiB, fsynced) | PG18 reference (README §5):
#   pg_basebackup --incremental 3.64-4.47 s, pg_combinebackup 5.14-6.03 s
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${BENCH:=$REPO/../shared/bench}"
. "$BENCH/common.sh"
: "${SCALE:=100}" "${INCR_SECONDS:=30}" "${JOBS:=2}" "${PORT:=56436}"
RESULTS_FILE=$RESULTS_DIR/bench_backup.tsv; : > "$RESULTS_FILE"
B=$PG15_BIN; P=$LIMITS_ROOT/pg15wn; X=$LIMITS_ROOT/wn; CAT=$X/cat

(cd "$REPO" && cargo build --release -q)
BIN=$LIMITS_ROOT/walnut-bin-backup
mkdir -p "$BIN"
cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
chmod 755 "$BIN" "$BIN"/*

pg_stop "$B" "$P"
rm -rf "$P" "$X"; mkdir -p "$P" "$X"; chown -R "$PG_OS_USER:" "$P" "$X"
pgx "$B" initdb -k -D "$P" -A trust -U postgres >/dev/null
as_pg "$BIN/walnut" init -B "$CAT"
as_pg "$BIN/walnut" add-instance -B "$CAT" --instance bench -D "$P"
cat >> "$P/postgresql.conf" <<CONF
wal_level = replica
archive_mode = on
archive_command = '$BIN/walnut-archive -B $CAT --instance bench %p %f'
max_wal_size = 4GB
CONF
pg_start "$B" "$P" "$PORT"
q() { psqlq "$B" "$PORT" "$1"; }
W() { as_pg "$BIN/walnut" "$@"; }
CONN=(-h "$SOCK_DIR" -p "$PORT" -U postgres)
t=$(now_ns); pgx "$B" pgbench "${CONN[@]}" -i -s "$SCALE" -q postgres > "$X/init.log" 2>&1
report1 pgbench_init_s${SCALE} "$(elapsed_ms "$t")" ms
q "checkpoint" >/dev/null
FILESB=$(( $(bytes_of "$P") - $(bytes_of "$P/pg_wal") ))
report1 datadir_size_excl_pg_wal "$((FILESB/1048576))" MiB

# cp -a of the stopped cluster: the copy limit, and the "before" image for blockdiff
pg_stop "$B" "$P"
wait_quiet; drop_caches
t=$(now_ns); cp -a "$P" "$X/cpa"; sync; ms=$(elapsed_ms "$t")
report1 copy_cp_a_ms "$ms" ms
report1 copy_cp_a_throughput "$(mbps "$(bytes_of "$P")" "$ms")" MB/s
pg_start "$B" "$P" "$PORT"

wait_quiet; drop_caches
t=$(now_ns); FULL=$(W backup -B "$CAT" --instance bench -b full -j "$JOBS" "${CONN[@]}" 2> "$X/full.log"); sync
ms=$(elapsed_ms "$t")
report1 walnut_full_ms "$ms" ms
report1 walnut_full_throughput "$(mbps "$FILESB" "$ms")" MB/s

pgx "$B" pgbench "${CONN[@]}" -c 4 -j 2 -T "$INCR_SECONDS" -n postgres > "$X/run.log" 2>&1
q "checkpoint" >/dev/null
python3 "$BENCH/blockdiff.py" "$X/cpa" "$P" > "$X/blockdiff.txt"
. "$X/blockdiff.txt"
cat "$X/blockdiff.txt"

wait_quiet; drop_caches
t=$(now_ns); PAGE=$(W backup -B "$CAT" --instance bench -b page -j "$JOBS" "${CONN[@]}" 2> "$X/page.log"); sync
report1 walnut_page_ms "$(elapsed_ms "$t")" ms
W show -B "$CAT" --instance bench --format json > "$X/show.json"
python3 - "$X/show.json" "$CAT/instances/bench/backups/$PAGE/manifest" "$PAGE" <<'PY' > "$X/page.txt"
import json, sys
rows = json.load(open(sys.argv[1])); page = [r for r in rows if r["id"] == sys.argv[3]][0]
pages = 0; inc_bytes = 0; whole_bytes = 0
for line in open(sys.argv[2]):
    if not line.startswith("{"): continue
    e = json.loads(line)
    if e["storage"] == "incremental":
        pages += e.get("changed_blocks", 0); inc_bytes += e["stored_size"]
    elif e["storage"] != "dir":
        whole_bytes += e["stored_size"]
print(f"page_data_bytes={page['data_bytes']}")
print(f"page_pages_stored={pages}")
print(f"page_incremental_bytes={inc_bytes}")
print(f"page_whole_file_bytes={whole_bytes}")
PY
cat "$X/page.txt"; . "$X/page.txt"
report1 walnut_page_data "$((page_data_bytes/1048576))" MiB
report1 walnut_page_pages_stored "$page_pages_stored" blocks
report1 walnut_page_data_vs_changed_blocks "$(awk -v a="$page_data_bytes" -v b="${changed_blocks:-0}" 'BEGIN{ if (b>0) printf "%.3f", a/(b*8192); else print "NA" }')" x

pgx "$B" psql "${CONN[@]}" -d postgres -Atqc "select pg_switch_wal()" >/dev/null
sleep 2
mkdir -p "$X/restore"; chown "$PG_OS_USER:" "$X/restore"
wait_quiet; drop_caches
t=$(now_ns); W restore -B "$CAT" --instance bench -i "$PAGE" -D "$X/restore/data" -j "$JOBS" 2> "$X/restore.log"; sync
report1 walnut_restore_full_plus_page_ms "$(elapsed_ms "$t")" ms
report1 walnut_restore_size "$(( $(bytes_of "$X/restore/data") / 1048576 ))" MiB
pg_stop "$B" "$P"
echo "full=$FULL page=$PAGE; results in $RESULTS_FILE"
