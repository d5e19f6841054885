#!/usr/bin/env bash
# bench-recovery.sh -- archive recovery through walnut-fetch (with its prefetch) against the
# floor: the same recovery with every segment already in pg_wal (no restore_command runs).
#   initdb (PG15, data checksums), archive_command = walnut-archive
#   pg_basebackup -X none                         the base both recoveries start from
#   pgbench -i -s $SCALE, pgbench -T $LOAD_SECONDS ...   >= MIN_SEGMENTS segments of WAL, archived
#   floor:  base + all segments copied into pg_wal, no recovery.signal (replays pg_wal)
#   walnut: base + empty pg_wal + recovery.signal + restore_command = walnut-fetch
# Each recovery is timed from `pg_ctl start` until the server accepts connections, with
# hot_standby off (the end of recovery and its checkpoint included), with the page cache
# dropped before each; the two are interleaved $ROUNDS times. Prints both medians and their
# ratio (target <= 1.15), and checks that both recoveries reach the same data.
# Needs root (drop_caches), PostgreSQL 15, ~6 GB under $LIMITS_ROOT.
# Run: bash contrib/bench-recovery.sh   (env: SCALE=50, LOAD_SECONDS=20, MIN_SEGMENTS=120, ROUNDS=3,
#      PREFETCH=8, PORT=56439, KEEP=0; KEEP=1 REUSE=1 re-times the kept base and archive)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${LIMITS_ROOT:=/tmp/limits}" "${PG15_BIN:=/usr/lib/postgresql/15/bin}" "${PG_OS_USER:=postgres}"
: "${SCALE:=50}" "${LOAD_SECONDS:=20}" "${MIN_SEGMENTS:=120}" "${ROUNDS:=3}" "${PREFETCH:=8}" "${PORT:=56439}" "${KEEP:=0}"
B=$PG15_BIN; X=$LIMITS_ROOT/recbench; P=$X/primary; CAT=$X/cat; SOCK=$X/sock
as_pg() { runuser -u "$PG_OS_USER" -- "$@"; }
now_ns() { date +%s%N; }
stop_all() {
  for d in "$P" "$X/r"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$B/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
}
cleanup() { stop_all; [ "$KEEP" = 1 ] || rm -rf "$X"; }
trap cleanup EXIT
q() { as_pg "$B/psql" -h "$SOCK" -p "$PORT" -U postgres -AtXq -d postgres -c "$1"; }
check_sql="select count(*), sum(abalance), (select count(*) from pgbench_history) from pgbench_accounts"

(cd "$REPO" && cargo build --release -q)
BIN=$X/bin
stop_all
if [ "${REUSE:-0}" = 1 ] && [ -s "$X/expect" ]; then
  cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
  expect=$(cat "$X/expect")
else
rm -rf "$X"; mkdir -p "$BIN" "$SOCK"
cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
chmod 755 "$X" "$BIN" "$BIN"/*; chown -R "$PG_OS_USER:" "$X"

as_pg "$B/initdb" -k -D "$P" -U postgres >/dev/null
as_pg "$BIN/walnut" init -B "$CAT"
as_pg "$BIN/walnut" add-instance -B "$CAT" --instance db -D "$P"
cat >> "$P/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$SOCK'
listen_addresses = ''
archive_mode = on
archive_command = '$BIN/walnut-archive -B $CAT --instance db %p %f'
max_wal_size = '4GB'
wal_keep_size = '8GB'
checkpoint_timeout = '1h'
shared_buffers = '256MB'
EOF
as_pg "$B/pg_ctl" -D "$P" -l "$X/primary.log" -w start >/dev/null
as_pg "$B/pg_basebackup" -h "$SOCK" -p "$PORT" -U postgres -D "$X/base" -X none -c fast
lsn0=$(q "select pg_current_wal_lsn()")
as_pg "$B/pgbench" -h "$SOCK" -p "$PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1
# pgbench until at least MIN_SEGMENTS segments of WAL were written since the base backup
while [ "$(q "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0') < $MIN_SEGMENTS * 16777216.0")" = t ]; do
  as_pg env PGOPTIONS='-c synchronous_commit=off' "$B/pgbench" -h "$SOCK" -p "$PORT" -U postgres \
    -c 4 -j 2 -T "$LOAD_SECONDS" postgres >/dev/null 2>&1
done
expect=$(q "$check_sql"); echo "$expect" > "$X/expect"
lsn1=$(q "select pg_current_wal_lsn()")
last=$(q "select pg_walfile_name(pg_current_wal_lsn())")
q "select pg_switch_wal()" >/dev/null
for _ in $(seq 1 600); do
  [ "$(q "select coalesce(last_archived_wal, '') >= '$last' from pg_stat_archiver")" = t ] && break
  sleep 0.2
done
segs=$(q "select (pg_wal_lsn_diff('$lsn1', '$lsn0') / 16777216)::int")
as_pg "$B/pg_ctl" -D "$P" -m fast -w stop >/dev/null
# every segment of the range, straight from the primary's pg_wal (the floor's pg_wal)
mkdir -p "$X/wal"
for f in "$P"/pg_wal/0*; do
  n=$(basename "$f"); [ ${#n} = 24 ] && [ "$n" \< "$last" -o "$n" = "$last" ] && cp "$f" "$X/wal/"
done
chown -R "$PG_OS_USER:" "$X"
echo "WAL to replay: $segs segments ($lsn0 .. $lsn1); $(ls "$X/wal" | wc -l) in the pg_wal copy"
fi

recover() {  # recover floor|walnut -> prints seconds
  local mode=$1 r=$X/r
  rm -rf "$r"; cp -a "$X/base" "$r"
  # no connections before recovery ends, so that `pg_ctl start -w` times the whole recovery
  # and no archiving of the promoted copy into the catalog (a new timeline would follow)
  printf "hot_standby = off\narchive_mode = off\n" >> "$r/postgresql.auto.conf"
  if [ "$mode" = floor ]; then
    cp "$X"/wal/* "$r/pg_wal/"
  else
    touch "$r/recovery.signal"
    echo "restore_command = '$BIN/walnut-fetch -B $CAT --instance db --prefetch $PREFETCH %f %p'" \
      >> "$r/postgresql.auto.conf"
  fi
  chown -R "$PG_OS_USER:" "$r"
  sync; echo 3 > /proc/sys/vm/drop_caches
  local t0; t0=$(now_ns)
  as_pg "$B/pg_ctl" -D "$r" -l "$X/$mode.log" -W start >/dev/null
  # hot_standby is off: the first successful query is after the end of recovery
  local seen=0
  until [ "$(q "select pg_is_in_recovery()" 2>/dev/null)" = f ]; do
    if [ -f "$r/postmaster.pid" ]; then seen=1
    elif [ $seen = 1 ]; then echo "$mode recovery: server exited, see $X/$mode.log" >&2; exit 1; fi
    sleep 0.05
  done
  local t1; t1=$(now_ns)
  local got; got=$(q "$check_sql")
  as_pg "$B/pg_ctl" -D "$r" -m fast -w stop >/dev/null
  [ "$got" = "$expect" ] || { echo "$mode recovery reached different data: $got vs $expect" >&2; exit 1; }
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f\n", (b-a)/1e9}'
}
median() { sort -g | awk '{v[NR]=$1} END{print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}'; }
: > "$X/floor.t"; : > "$X/walnut.t"
for i in $(seq 1 "$ROUNDS"); do
  f=$(recover floor); w=$(recover walnut)
  echo "round $i: floor ${f}s, walnut-fetch ${w}s"
  echo "$f" >> "$X/floor.t"; echo "$w" >> "$X/walnut.t"
done
mf=$(median < "$X/floor.t"); mw=$(median < "$X/walnut.t")
echo
printf '%-52s %8s s\n' "recovery, segments already in pg_wal (median)" "$mf"
printf '%-52s %8s s\n' "recovery through walnut-fetch --prefetch $PREFETCH (median)" "$mw"
printf '%-52s %8.2f  (target <= 1.15)\n' "ratio walnut-fetch / floor" "$(awk -v a="$mw" -v b="$mf" 'BEGIN{print a/b}')"
