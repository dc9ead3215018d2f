#!/usr/bin/env bash
# packaging/check-fresh.sh [bookworm|trixie] [--no-suite] [--wait-idle] [--reuse]
#                          [--only TESTS]
#
# What a newcomer gets on a stock Debian server: debootstraps a minimal Debian 12 or 13
# (--variant=minbase --include=python3,ca-certificates: no pip, no venv, no compiler), copies
# this tree into it (its git files, with ../shared beside it when there is one) and runs, as
# root inside it, the README's two commands exactly as the README spells them:
#   1. setup + the demo guest (must print what the guest saw and wrote), twice: the second
#      run shows setup is quick and harmless when everything is there already;
#   2. setup + the whole test suite;
# then installs the project as an operator would (pip install . into a venv of its own, with
# python-daemon beside it) and runs pyvirtiofsd --version / --print-capabilities from /.
#
# The system runs in its own mount namespace whose root is the new system (pivot_root, as
# a container's), with /proc, /sys, /dev (bind) and a tmpfs /dev/shm mounted, so QEMU and
# the tests' user namespaces work as on a real machine. Logs and a summary go to
# $PYVIRTIOFSD_FRESH_DIR/<release>/ (default /var/tmp/pyvirtiofsd-fresh); the system stays
# there for a look inside until the next run.
#
#   --no-suite   stop after command 1 and the operator install
#   --wait-idle  before the suite, wait until no other pytest or benchmark runs here
#   --reuse      keep an earlier run's system instead of a fresh debootstrap (quicker
#                retries; not what a newcomer has)
#   --only TESTS command 2 runs pytest on TESTS (a path under tests/) instead of the whole
#                suite: one part checked in a fresh system (the summary says so)
#
# The mirror is the one this machine's apt configuration uses for the Debian archive. The
# new system gets this machine's name servers, locally added CA certificates
# (/usr/local/share/ca-certificates) and /etc/pip.conf, if any: the site's network setup,
# which a server at the same site would have too; nothing else comes from the host.
set -euo pipefail

release=bookworm
run_suite=1
wait_idle=0
reuse=0
only=
want_only=0
for arg in "$@"; do
  if [ "$want_only" = 1 ]; then only=$arg; want_only=0; continue; fi
  case "$arg" in
    --only) want_only=1 ;;
    bookworm|trixie) release=$arg ;;
    --no-suite) run_suite=0 ;;
    --wait-idle) wait_idle=1 ;;
    --reuse) reuse=1 ;;
    *) echo "usage: $0 [bookworm|trixie] [--no-suite] [--wait-idle] [--reuse] [--only TESTS]" >&2
       exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "check-fresh: run as root (debootstrap, mounts)" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${PYVIRTIOFSD_FRESH_DIR:-/var/tmp/pyvirtiofsd-fresh}/$release
root=$work/root
cache=${PYVIRTIOFSD_FRESH_DIR:-/var/tmp/pyvirtiofsd-fresh}/debs-$release
src=/root/src/pyvirtiofsd  # the tree's path inside the new system
mkdir -p "$work" "$cache"
summary=$work/summary.txt
: > "$summary"
note() { echo "check-fresh: $*" | tee -a "$summary"; }

command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

# The README's two commands, word for word (the lines of its first sh block that run setup).
mapfile -t commands < <(grep -E '^bash \.ci/setup && ' "$repo/README.md" | head -2)
[ ${#commands[@]} = 2 ] || { echo "check-fresh: README.md does not give two commands" >&2; exit 1; }
if [ -n "$only" ]; then
  case "$only" in tests/*) ;; *) echo "check-fresh: --only takes a path under tests/" >&2; exit 2 ;; esac
  [ "${commands[1]% tests}" != "${commands[1]}" ] \
    || { echo "check-fresh: command 2 does not end in ' tests'" >&2; exit 1; }
  commands[1]="${commands[1]% tests} $only"
  note "--only: command 2 runs $only, not the whole suite"
fi
note "release $release; command 1: ${commands[0]}"
note "command 2: ${commands[1]}"

mirror=$(cd "$repo" && python3 -c \
  'from tests.support import debian; print(debian.debian_mirror().uris[0])')
case "$mirror" in
  http://*|https://*) ;;
  *) echo "check-fresh: debootstrap cannot use the mirror $mirror" >&2; exit 1 ;;
esac

if [ "$reuse" = 1 ] && [ -x "$root/usr/bin/python3" ]; then
  note "reusing $root"
else
  rm -rf "$root"
  start=$SECONDS
  debootstrap --variant=minbase --include=python3,ca-certificates --cache-dir="$cache" \
    "$release" "$root" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  note "debootstrap $release from $mirror: $((SECONDS - start)) s"
fi

# the site's network setup (see above)
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"

# the tree: its git files as they are in the work tree, and ../shared beside it
rm -rf "$root/root/src"
mkdir -p "$root$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
   | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
   | tar --null -T - -cf -) | tar -xf - -C "$root$src"
if [ -d "$repo/../shared" ]; then
  cp -a "$repo/../shared" "$root/root/src/shared"
fi

# in_root COMMAND: run a shell command as root inside the new system, from the tree, with a
# clean environment (the proxy settings excepted) and the mounts a machine has.
in_root() {
  local keep=()
  for var in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -z "${!var:-}" ] || keep+=("$var=${!var}")
  done
  unshare --mount --propagation private --fork -- bash -c '
    set -e
    root=$1; shift
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"
    mount --bind /dev "$root/dev"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
    cd "$root"
    mkdir -p .old-root
    pivot_root . .old-root
    umount -l /.old-root
    rmdir /.old-root
    exec chroot . "$@"
  ' in_root "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${keep[@]}" \
      /bin/bash -c "cd $src && $1"
}

# step NAME LOG COMMAND: run COMMAND inside, log it, note its outcome and duration
failed=0
step() {
  local name=$1 log=$2 cmd=$3 start=$SECONDS rc=0
  in_root "$cmd" > "$log" 2>&1 || rc=$?
  note "$name: exit $rc in $((SECONDS - start)) s (log: $log)"
  [ "$rc" = 0 ] || failed=1
  return 0
}

step "command 1 (first run)" "$work/command1.log" "${commands[0]}"
sed -n '/^host: serving/,$p' "$work/command1.log" | head -40 | tee -a "$summary"
step "command 1 (second run)" "$work/command1-again.log" "${commands[0]}"
grep -E "^(setup|guest):" "$work/command1-again.log" | tee -a "$summary" || true

step "operator install" "$work/operator.log" "
  set -e
  python3 -m venv /opt/pyvirtiofsd
  /opt/pyvirtiofsd/bin/pip install -q --disable-pip-version-check . python-daemon
  cd /
  /opt/pyvirtiofsd/bin/pyvirtiofsd --version
  /opt/pyvirtiofsd/bin/pyvirtiofsd --print-capabilities
  /opt/pyvirtiofsd/bin/python -c 'import daemon; print(\"python-daemon:\", daemon.DaemonContext)'
  ls /opt/pyvirtiofsd/lib/python3*/site-packages/pyvirtiofsd/daemon/native/_sys*.so \
     /opt/pyvirtiofsd/lib/python3*/site-packages/pyvirtiofsd/shm_table/_native*.so"
tail -6 "$work/operator.log" | tee -a "$summary"

if [ "$run_suite" = 1 ]; then
  if [ "$wait_idle" = 1 ]; then
    while pgrep -f "pytest|benchmarks.run|tests.fuzz.run" >/dev/null; do sleep 30; done
  fi
  step "command 2" "$work/command2.log" "${commands[1]}"
  grep -E "^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$work/command2.log" \
    | tail -2 | tee -a "$summary" || true
fi
note "$( [ $failed = 0 ] && echo PASS || echo FAIL ) ($summary)"
exit $failed
