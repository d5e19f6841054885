#!/usr/bin/env bash
# bench-archive.sh -- walnut-archive / walnut-fetch against pgBackRest, in the same run, with
# the shared baseline scripts (/work/shared/bench, see its README):
#   03_archive_cmd.sh          ms per archive_command / restore_command call (40 segments)
#   03b_archiver_throughput.sh segments/s the PG15 archiver drains (backlog, look-ahead on)
#                              and keeps up with under full-speed pgbench
# Needs: root, PostgreSQL 15, `apt-get install -y pgbackrest lz4`; builds the WAL corpus with
# 02_walcorpus.sh when missing (~1.5 min). Shortened 03b (env LOAD_SECONDS, BACKLOG_SECONDS)
# and only the peers needed for the comparison (env VARIANTS_03, VARIANTS_03B).
# Results: $LIMITS_ROOT/results/03_archive_cmd.tsv and 03b_archiver_throughput.tsv.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${BENCH:=$REPO/../shared/bench}" "${LIMITS_ROOT:=/tmp/limits}" "${PG_OS_USER:=postgres}"
: "${VARIANTS_03:=cp_durable pgbr_lz4}" "${VARIANTS_03B:=pgbr_lz4}"
: "${LOAD_SECONDS:=20}" "${BACKLOG_SECONDS:=20}" "${LOOK_AHEAD:=8}"
export LIMITS_ROOT PG_OS_USER

command -v pgbackrest >/dev/null && command -v lz4 >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest lz4 >/dev/null; }

(cd "$REPO" && cargo build --release -q)
BIN=$LIMITS_ROOT/walnut-bin
mkdir -p "$BIN"
cp "$REPO"/target/release/{walnut,walnut-archive,walnut-fetch} "$BIN/"
chmod 755 "$BIN" "$BIN"/*

[ -f "$LIMITS_ROOT/pg15corpus/PG_VERSION" ] || bash "$BENCH/02_walcorpus.sh"

# one catalog per script: 03 archives corpus segments, 03b the copy's new WAL
for c in cat03 cat03b; do
  rm -rf "${LIMITS_ROOT:?}/$c"; mkdir -p "$LIMITS_ROOT/$c"; chown "$PG_OS_USER:" "$LIMITS_ROOT/$c"
  runuser -u "$PG_OS_USER" -- "$BIN/walnut" init -B "$LIMITS_ROOT/$c"
  runuser -u "$PG_OS_USER" -- "$BIN/walnut" add-instance -B "$LIMITS_ROOT/$c" --instance corpus \
    -D "$LIMITS_ROOT/pg15corpus"
done

echo "== 03_archive_cmd.sh (walnut vs pgBackRest, per call)"
VARIANTS="$VARIANTS_03" \
CANDIDATE_PUSH="$BIN/walnut-archive -B $LIMITS_ROOT/cat03 --instance corpus %p %f" \
CANDIDATE_GET="$BIN/walnut-fetch -B $LIMITS_ROOT/cat03 --instance corpus %f %p" \
  bash "$BENCH/03_archive_cmd.sh"

echo "== 03b_archiver_throughput.sh (walnut look-ahead $LOOK_AHEAD vs pgBackRest)"
VARIANTS="$VARIANTS_03B" LOAD_SECONDS="$LOAD_SECONDS" BACKLOG_SECONDS="$BACKLOG_SECONDS" \
CANDIDATE_PUSH="$BIN/walnut-archive -B $LIMITS_ROOT/cat03b --instance corpus --look-ahead $LOOK_AHEAD %p %f" \
  bash "$BENCH/03b_archiver_throughput.sh"

echo "== walnut archive after 03b"
runuser -u "$PG_OS_USER" -- "$BIN/walnut" show -B "$LIMITS_ROOT/cat03b" --instance corpus --archive
