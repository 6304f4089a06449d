#!/bin/sh
# SPDX-License-Identifier: MIT
# bootstrap.sh: from a fresh clone to a running demo or a full test run.
#
#   ./bootstrap.sh demo    install what is missing, build, run the demo
#   ./bootstrap.sh check   install what is missing, build, run every test
#                          (make check, then make distcheck)
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

packages="build-essential autoconf automake libtool pkg-config check
  libjansson-dev libxxhash-dev libopenblas-dev zlib1g-dev liburing-dev
  libsystemd-dev libconfig-dev python3 python3-numpy"
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

case $what in
demo)
	BUILD_DIR=$build exec "$src/demo.sh"
	;;
check)
	make -C "$build" -j"$jobs" check
	make -C "$build" -j"$jobs" distcheck
	;;
esac
