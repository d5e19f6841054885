#!/bin/sh
# Installs walnut into a prefix: stripped binaries (their debug information split into
# separate files that gdb finds by itself), man pages, shell completions, systemd units
# and the cron example.
#
#   contrib/install.sh [--bindir DIR] PREFIX
#
# - Binaries come from DIR (default target/release; build them with
#   `cargo build --release`).
# - PREFIX/bin/walnut, walnut-archive, walnut-fetch: stripped; their debug information in
#   PREFIX/bin/.debug/NAME.debug, linked by .gnu_debuglink (gdb looks in BINDIR/.debug).
# - PREFIX/share/man/man1/*.1 (walnut man), completions for bash, zsh and fish.
# - PREFIX/lib/systemd/system/*.service, *.timer; PREFIX/share/doc/walnut/walnut.cron and
#   postgresql.walnut.conf. Units name /usr/local/bin: with another prefix, adjust them
#   (they are examples; the instance is called "main").
# Nothing outside PREFIX is written. DESTDIR is honoured for staging (DESTDIR/PREFIX).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
bindir_src="$top/target/release"
if [ "${1:-}" = "--bindir" ]; then
  bindir_src=$2
  shift 2
fi
if [ $# -ne 1 ]; then
  echo "usage: $0 [--bindir DIR] PREFIX" >&2
  exit 2
fi
prefix=$1
case "$prefix" in
  /*) ;;
  *) echo "install.sh: PREFIX must be an absolute path, not '$prefix'" >&2; exit 2 ;;
esac
root="${DESTDIR:-}$prefix"

for b in walnut walnut-archive walnut-fetch; do
  if [ ! -x "$bindir_src/$b" ]; then
    echo "install.sh: $bindir_src/$b is missing: run 'cargo build --release' first" >&2
    exit 1
  fi
done
for tool in objcopy; do
  command -v "$tool" >/dev/null || { echo "install.sh: $tool (binutils) is needed" >&2; exit 1; }
done

install -d "$root/bin/.debug" "$root/share/man/man1" \
  "$root/share/bash-completion/completions" "$root/share/zsh/site-functions" \
  "$root/share/fish/vendor_completions.d" "$root/lib/systemd/system" "$root/share/doc/walnut"

for b in walnut walnut-archive walnut-fetch; do
  tmp="$root/bin/.$b.tmp.$$"
  cp "$bindir_src/$b" "$tmp"
  # Debug information to its own file, the binary stripped of it and of the symbol
  # table, with a link (name and CRC) to the debug file.
  objcopy --only-keep-debug "$tmp" "$root/bin/.debug/$b.debug"
  chmod 0644 "$root/bin/.debug/$b.debug"
  objcopy --strip-all "$tmp"
  (cd "$root/bin/.debug" && objcopy --add-gnu-debuglink="$b.debug" "$tmp")
  chmod 0755 "$tmp"
  mv -f "$tmp" "$root/bin/$b"
done

# Man pages and completions come from the installed binary itself (clap definitions).
mandir=$(mktemp -d)
trap 'rm -rf "$mandir"' EXIT
"$root/bin/walnut" man --output "$mandir" >/dev/null
install -m 0644 "$mandir"/*.1 "$root/share/man/man1/"
"$root/bin/walnut" completions bash >"$root/share/bash-completion/completions/walnut"
"$root/bin/walnut" completions zsh >"$root/share/zsh/site-functions/_walnut"
"$root/bin/walnut" completions fish >"$root/share/fish/vendor_completions.d/walnut.fish"

for u in "$here"/*.service "$here"/*.timer; do
  install -m 0644 "$u" "$root/lib/systemd/system/"
done
install -m 0644 "$here/walnut.cron" "$here/postgresql.walnut.conf" "$root/share/doc/walnut/"

echo "installed walnut into $root"
