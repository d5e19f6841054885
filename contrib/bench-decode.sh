#!/usr/bin/env bash
# bench-decode.sh -- decode+index speed of walnut against `pg_waldump -q` on real segments.
#
# Usage: contrib/bench-decode.sh [CORPUS_DIR]
#   CORPUS_DIR: a directory of archived 16 MiB WAL segments. Default: $WALNUT_WAL_CORPUS,
#   else /tmp/limits/walcorpus if present, else /tmp/walnut-bench-corpus, which is built
#   here on first use: PG15 (initdb -k, wal_level=replica, archive_mode=on, cp archive),
#   pgbench -i -s $SCALE, then pgbench -c 4 -j 2 -T $SECONDS_RUN (about a minute).
# Env: PG_BIN (default /usr/lib/postgresql/15/bin), SCALE (20), SECONDS_RUN (20),
#      REPEAT (runs per segment and tool, default 7), PORT (56447).
# Prints, per segment, the median milliseconds of walnut (in-process, single thread,
# release build) and of pg_waldump -q (process wall time), and a summary with GB/s.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
: "${PG_BIN:=/usr/lib/postgresql/15/bin}" "${SCALE:=20}" "${SECONDS_RUN:=20}" "${PORT:=56447}"
CORPUS=${1:-${WALNUT_WAL_CORPUS:-}}
if [ -z "$CORPUS" ]; then
  if [ -d /tmp/limits/walcorpus ] && ls /tmp/limits/walcorpus | grep -q '^[0-9A-F]\{24\}$'; then
    CORPUS=/tmp/limits/walcorpus
  else
    CORPUS=/tmp/walnut-bench-corpus
  fi
fi

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if ! ls "$CORPUS" 2>/dev/null | grep -q '^[0-9A-F]\{24\}$'; then
  echo "building a WAL corpus in $CORPUS (pgbench -i -s $SCALE, then ${SECONDS_RUN}s)" >&2
  WORK=$(mktemp -d /tmp/walnut-bench-pg.XXXXXX)
  mkdir -p "$CORPUS" "$WORK/sock"
  [ "$(id -u)" = 0 ] && chown postgres: "$CORPUS" "$WORK" "$WORK/sock"
  as_pg "$PG_BIN/initdb" -k -D "$WORK/data" -U postgres -A trust --no-sync >/dev/null
  cat >> "$WORK/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
port = $PORT
wal_level = replica
archive_mode = on
archive_command = 'cp %p $CORPUS/%f'
max_wal_size = 4GB
EOF
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w start >/dev/null
  trap 'as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null 2>&1 || true' EXIT
  as_pg "$PG_BIN/pgbench" -h "$WORK/sock" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  as_pg "$PG_BIN/psql" -h "$WORK/sock" -p "$PORT" -U postgres -Xqc checkpoint postgres
  as_pg "$PG_BIN/pgbench" -h "$WORK/sock" -p "$PORT" -U postgres -c 4 -j 2 -T "$SECONDS_RUN" postgres >/dev/null 2>&1
  last=$(as_pg "$PG_BIN/psql" -h "$WORK/sock" -p "$PORT" -U postgres -XAtqc "select pg_walfile_name(pg_switch_wal())" postgres)
  for _ in $(seq 600); do
    a=$(as_pg "$PG_BIN/psql" -h "$WORK/sock" -p "$PORT" -U postgres -XAtqc "select coalesce(last_archived_wal,'') from pg_stat_archiver" postgres)
    { [ "$a" \> "$last" ] || [ "$a" = "$last" ]; } && break
    sleep 0.5
  done
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m fast -w stop >/dev/null
  trap - EXIT
  rm -rf "$WORK"
fi

cd "$HERE"
cargo build --release --quiet --bench decode 2>/dev/null || cargo build --release --bench decode
PG_WALDUMP="$PG_BIN/pg_waldump" REPEAT="${REPEAT:-7}" cargo bench --quiet --bench decode -- "$CORPUS"
