#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moed.transformers against transformers itself: runs
# tests/python/test_transformers.py, which builds, packs and serves a small
# random model of each architecture with a real moed of its own (the moed
# and moectl built here) and compares generation, every MoE layer and
# router logits with transformers alone; four processes through one moed;
# peak RSS of a load without experts; refusals.
#
# Needs a Python with torch and transformers >= 5 (from PyPI; python/
# README.md says how to install them in a virtual environment):
# $MOED_TEST_PYTHON, else the venv ./bootstrap.sh check makes in the build
# directory ($top_builddir/venv), else $PYTHON or /usr/bin/python3 if one
# of them has both.  None: skip (77), saying how to get one.
#
# Environment: MOECTL, MOED, top_builddir, top_srcdir (from make check).
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"

# usable PY: PY runs, has torch and transformers 5 or newer
usable() {
	[ -n "$1" ] && [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
	"$1" -c 'import torch, transformers, sys
sys.exit(int(transformers.__version__.split(".")[0]) < 5)' >/dev/null 2>&1
}

howto="python3 -m venv VENV && VENV/bin/pip install torch 'transformers>=5' numpy, then MOED_TEST_PYTHON=VENV/bin/python make check (or ./bootstrap.sh check, which makes build/venv)"
PY=
if [ -n "${MOED_TEST_PYTHON:-}" ]; then
	usable "$MOED_TEST_PYTHON" ||
		skip "MOED_TEST_PYTHON=$MOED_TEST_PYTHON lacks torch or transformers >= 5: $howto"
	PY=$MOED_TEST_PYTHON
else
	for cand in "${top_builddir:-.}/venv/bin/python" "${PYTHON:-}" /usr/bin/python3; do
		if usable "$cand"; then PY=$cand; break; fi
	done
	[ -n "$PY" ] || skip "no Python with torch and transformers >= 5: $howto"
fi

LIB=${top_builddir:-.}/libmoeclient/.libs/libmoeclient.so.0
[ -f "$LIB" ] || fail "no $LIB: build libmoeclient first"

PYTHONPATH=${top_srcdir:-.}/python${PYTHONPATH:+:$PYTHONPATH}
MOED_LIBRARY=$LIB
asan_preload "$LIB"
TMPDIR=$T
export PYTHONPATH MOED_LIBRARY MOECTL MOED TMPDIR
unset MOED_SOCKET
# one thread per process: four generating processes and moed share the
# machine, and the results do not depend on it
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMP_NUM_THREADS

echo "python: $PY ($("$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'))"
# no __pycache__ in the source tree (read-only under make distcheck)
PYTHONDONTWRITEBYTECODE=1
export PYTHONDONTWRITEBYTECODE
LAST_CMD=
"$PY" "${top_srcdir:-.}/tests/python/test_transformers.py" -v || fail "the transformers tests failed"
exit 0
