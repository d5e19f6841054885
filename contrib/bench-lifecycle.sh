#!/usr/bin/env bash
# bench-lifecycle.sh -- lifecycle command speed.
#   bench_delete: `walnut delete --expired --delete-wal` on a synthetic local catalog of 50
#                 backups (FULL every 7th, PAGE between, one a day; 20 data objects each)
#                 and 10,000 archived segments with their indexes (20,000 WAL objects);
#                 redundancy 2 expires 36 backups and ~7,000 segments. Target: < 2 s.
#                 The catalog is built by an ignored integration test (no server needed).
# Usage: contrib/bench-lifecycle.sh [bench_delete ...]   (env RUNS, default 3; medians)
# Binaries: target/debug (the dev profile is optimised); set BIN to use others.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
: "${RUNS:=3}" "${BIN:=$REPO/target/debug}" "${WORK:=$(mktemp -d /tmp/bench-lifecycle.XXXXXX)}"
trap 'rm -rf "$WORK"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

bench_delete() {
  (cd "$REPO" && cargo build -q && cargo test -q --test it --no-run 2>/dev/null)
  local times=()
  for r in $(seq "$RUNS"); do
    local cat="$WORK/cat$r"
    (cd "$REPO" && WALNUT_BENCH_CATALOG="$cat" cargo test -q --test it \
      lifecycle_bench_build_synthetic_catalog -- --ignored >/dev/null 2>&1)
    sync
    # wall, user and system seconds: the wall time on a shared disk is mostly fsync waits
    /usr/bin/time -f "%e %U %S" -o "$WORK/time$r" "$BIN/walnut" delete -B "$cat" \
      --instance db --expired --retention-redundancy 2 --delete-wal >"$WORK/out$r" 2>&1
    read -r wall user sys <"$WORK/time$r"
    times+=("$wall")
    echo "run $r: wall $wall s, user $user s, system $sys s"
    local left_b left_w
    left_b=$(ls "$cat/instances/db/backups" | wc -l)
    left_w=$(ls "$cat/instances/db/wal/00000001" | wc -l)
    echo "  backup directories left $left_b (empty ones keep their lock files)," \
      "WAL objects left $left_w, $(grep -c '(expired)' "$WORK/out$r" || true) backups deleted"
    rm -rf "$cat"
  done
  echo "bench_delete: median $(printf '%s\n' "${times[@]}" | median) s over $RUNS runs (target < 2 s)"
}

for b in "${@:-bench_delete}"; do "$b"; done
