#!/bin/sh
# SPDX-License-Identifier: MIT
# bootstrap.sh: from a fresh clone to a running demo or a full test run.
#
#   ./bootstrap.sh demo    install what is missing, build, run the demo
#   ./bootstrap.sh check   install what is missing, build, run every test
#                          (make check, then make distcheck)
#
# The transformers tests (tests/python_transformers.sh) need torch and
# transformers from PyPI: `check` puts them in a virtual environment,
# $build/venv (torch's CPU build where download.pytorch.org is reachable,
# else PyPI's, several GB), when pip can reach an index, and the tests use
# it; otherwise they are reported as skipped.  MOED_PY_SETUP=0 never makes
# it, MOED_PY_SETUP=1 makes it for `demo` too (whose last step then runs a
# transformers model).
#
# Missing Debian packages are installed with apt-get when run as root;
# otherwise the script names them and stops.  The build goes to ./build
# (BUILD_DIR to change it); an existing build is reused.
set -eu

cd "$(dirname "$0")"
src=$(pwd)
build=${BUILD_DIR:-$src/build}
what=${1:-demo}

case $what in
demo|check) ;;
*) echo "usage: $0 demo|check" >&2; exit 2 ;;
esac

# clang and libclang-rt-14-dev: the fuzz harnesses (clang only recommends
# its fuzzer runtime, and recommendations are not installed here)
packages="build-essential autoconf automake libtool pkg-config check
  libjansson-dev libxxhash-dev libopenblas-dev zlib1g-dev liburing-dev
  libsystemd-dev libconfig-dev python3 python3-numpy python3-venv groff-base
  clang libclang-rt-14-dev"
missing=
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "bootstrap: missing Debian packages:$missing" >&2
		echo "bootstrap: run as root, or: sudo apt-get install$missing" >&2
		exit 1
	fi
	echo "bootstrap: installing$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

jobs=$(nproc 2>/dev/null || echo 2)
if [ ! -x "$src/configure" ]; then
	echo "bootstrap: autoreconf"
	autoreconf -fi >/dev/null
fi
mkdir -p "$build"
if [ ! -f "$build/Makefile" ]; then
	echo "bootstrap: configure"
	(cd "$build" && "$src/configure" -q)
fi
echo "bootstrap: make"
make -C "$build" -s -j"$jobs" >/dev/null

# setup_venv: $build/venv with torch and transformers for the transformers
# tests and the demo's Python step.  torch's CPU build comes from
# download.pytorch.org (about 200 MB); where that is unreachable, from the
# default index (PyPI's Linux build bundles CUDA: several GB, minutes).  On
# any failure (no network, no space) the partial venv goes and the tests
# skip.
setup_venv() {
	venv=$build/venv
	usable='import sys, torch, transformers
sys.exit(int(transformers.__version__.split(".")[0]) < 5)'
	if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$usable" >/dev/null 2>&1; then
		echo "bootstrap: Python venv: $venv (reused)"
		return 0
	fi
	echo "bootstrap: Python venv with torch and transformers in $venv (MOED_PY_SETUP=0: skip)"
	t0=$(date +%s)
	rm -rf "$venv"
	pip="$venv/bin/pip install -q --disable-pip-version-check --timeout 30"
	log=$build/venv.log
	if python3 -m venv "$venv" >"$log" 2>&1 &&
	   { $pip --retries 1 --index-url https://download.pytorch.org/whl/cpu torch >>"$log" 2>&1 ||
	     { echo "bootstrap: torch's CPU index is unreachable: torch from the default index" \
		"(PyPI: the CUDA build, several GB)"; $pip torch >>"$log" 2>&1; }; } &&
	   $pip 'transformers>=5' numpy safetensors >>"$log" 2>&1 &&
	   "$venv/bin/python" -c "$usable" >>"$log" 2>&1; then
		echo "bootstrap: Python venv ready in $(( $(date +%s) - t0 )) s"
	else
		echo "bootstrap: no Python venv after $(( $(date +%s) - t0 )) s (see $log):" \
			"the transformers tests will be skipped"
		rm -rf "$venv"
	fi
}

case ${MOED_PY_SETUP:-auto} in
0|no) ;;
1|yes) setup_venv ;;
*) if [ "$what" = check ]; then setup_venv; fi ;;
esac
if [ -x "$build/venv/bin/python" ]; then
	MOED_TEST_PYTHON=${MOED_TEST_PYTHON:-$build/venv/bin/python}
	export MOED_TEST_PYTHON
fi

case $what in
demo)
	BUILD_DIR=$build exec "$src/demo.sh"
	;;
check)
	make -C "$build" -j"$jobs" check
	make -C "$build" -j"$jobs" distcheck
	;;
esac
