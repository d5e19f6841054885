#!/usr/bin/env bash
# walnut demo: the main job end to end on a throwaway cluster.
#
#   1. creates a PostgreSQL cluster whose archive_command is walnut-archive;
#   2. runs pgbench;
#   3. takes a FULL and then a PAGE backup;
#   4. shows `walnut show` and `walnut show --archive`;
#   5. restores the PAGE backup to a named restore point in a second directory, starts it
#      and checks that the data matches what the primary had at that point.
#
# Needs PostgreSQL server binaries (PG_BIN, default /usr/lib/postgresql/15/bin) and cargo.
# Everything lives in a temp directory that is removed at the end; servers are stopped even
# when a step fails. Run as root (servers then run as the `postgres` user) or as any user.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_OS_USER=${PG_OS_USER:-postgres}
SCALE=${SCALE:-10}
here=$(cd "$(dirname "$0")/.." && pwd)

step_no=0
step() { step_no=$((step_no + 1)); step_title=$1; step_start=$(date +%s%N); printf '\n== %d. %s\n' "$step_no" "$1"; }
done_step() { printf '   done in %s s\n' "$(awk -v a="$step_start" -v b="$(date +%s%N)" 'BEGIN{printf "%.1f",(b-a)/1e9}')"; }

if [ ! -x "$PG_BIN/initdb" ]; then
  echo "demo: no PostgreSQL server binaries in $PG_BIN (install postgresql-15 or set PG_BIN)" >&2
  exit 1
fi

step "Build walnut (release)"
(cd "$here" && cargo build --release --quiet)
BIN="$here/target/release"
done_step

if [ "$(id -u)" = 0 ]; then
  as_pg() { runuser -u "$PG_OS_USER" -- "$@"; }
else
  as_pg() { "$@"; }
  PG_OS_USER=$(id -un)
fi

work=$(mktemp -d /tmp/walnut-demo.XXXXXX)
chmod 755 "$work"
[ "$(id -u)" = 0 ] && chown "$PG_OS_USER:" "$work"
P1=$((20000 + RANDOM % 10000)); P2=$((P1 + 1))
PRIMARY=$work/primary RESTORED=$work/restored CAT=$work/catalog SOCK=$work
cleanup() {
  for d in "$RESTORED" "$PRIMARY"; do
    [ -f "$d/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

psql1() { as_pg "$PG_BIN/psql" -X -A -t -q -h "$SOCK" -p "$P1" -U postgres -d postgres -c "$1"; }
psql2() { as_pg "$PG_BIN/psql" -X -A -t -q -h "$SOCK" -p "$P2" -U postgres -d postgres -c "$1"; }
walnut() { as_pg "$BIN/walnut" "$@"; }

step "Create a cluster (data checksums on) archiving through walnut-archive"
as_pg "$PG_BIN/initdb" -D "$PRIMARY" -U postgres -A trust -k >/dev/null
walnut init -B "$CAT"
cat >> "$PRIMARY/postgresql.conf" <<CONF
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $P1
wal_level = replica
archive_mode = on
archive_command = '$BIN/walnut-archive -B $CAT --instance demo %p %f'
max_wal_size = 1GB
CONF
walnut add-instance -B "$CAT" --instance demo -D "$PRIMARY" -h "$SOCK" -p "$P1" -U postgres
as_pg "$PG_BIN/pg_ctl" -D "$PRIMARY" -l "$work/primary.log" -w start >/dev/null
echo "   cluster at $PRIMARY, catalog at $CAT"
done_step

step "pgbench -i -s $SCALE, then 10 s of pgbench"
as_pg "$PG_BIN/pgbench" -h "$SOCK" -p "$P1" -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -1
as_pg "$PG_BIN/pgbench" -h "$SOCK" -p "$P1" -U postgres -c 4 -T 10 postgres 2>&1 | grep -E '^(tps|number of transactions actually)' || true
done_step

step "FULL backup"
walnut backup -B "$CAT" --instance demo -b full -j 2
done_step

step "10 s more of pgbench, then a PAGE backup (only the blocks the WAL index says changed)"
as_pg "$PG_BIN/pgbench" -h "$SOCK" -p "$P1" -U postgres -c 4 -T 10 postgres 2>&1 | grep -E '^tps' || true
walnut backup -B "$CAT" --instance demo -b page -j 2
done_step

step "A named restore point, with a fingerprint of the data at that point"
psql1 "create table demo_marker as select now() as at"
expected=$(psql1 "select count(*), sum(abalance), sum(bbalance) from pgbench_accounts a join pgbench_branches b using (bid)")
psql1 "select pg_create_restore_point('walnut_demo')" >/dev/null
echo "   fingerprint at walnut_demo: $expected"
as_pg "$PG_BIN/pgbench" -h "$SOCK" -p "$P1" -U postgres -c 2 -T 3 postgres >/dev/null 2>&1
psql1 "select pg_switch_wal()" >/dev/null
echo "   (3 s more pgbench after the restore point: the restore must not include it)"
sleep 2
done_step

step "walnut show, walnut show --archive"
walnut show -B "$CAT" --instance demo
echo
walnut show -B "$CAT" --instance demo --archive
done_step

step "Restore the PAGE backup to restore point walnut_demo into a second directory"
mkdir -p "$RESTORED"; chmod 700 "$RESTORED"; [ "$(id -u)" = 0 ] && chown "$PG_OS_USER:" "$RESTORED"
walnut restore -B "$CAT" --instance demo -D "$RESTORED" -j 2 \
  --recovery-target-name walnut_demo --recovery-target-action promote
cat >> "$RESTORED/postgresql.conf" <<CONF
port = $P2
archive_mode = off
CONF
as_pg "$PG_BIN/pg_ctl" -D "$RESTORED" -l "$work/restored.log" -w -t 300 start >/dev/null
for _ in $(seq 1 300); do
  [ "$(psql2 'select pg_is_in_recovery()' 2>/dev/null)" = f ] && break
  sleep 0.5
done
done_step

step "Check: the restored cluster has the data of the restore point"
got=$(psql2 "select count(*), sum(abalance), sum(bbalance) from pgbench_accounts a join pgbench_branches b using (bid)")
echo "   primary at walnut_demo: $expected"
echo "   restored cluster:       $got"
if [ "$got" = "$expected" ]; then
  echo "   MATCH"
else
  echo "   MISMATCH" >&2
  exit 1
fi
done_step
echo
echo "demo finished: cleaning up $work"
