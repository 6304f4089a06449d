#!/bin/sh
# SPDX-License-Identifier: MIT
#
# The moed Python package against a real moed: gen-model + pack a small
# model, start moed on a temporary socket (2 MoE layers, with a
# request limit of 16 tokens so that pieces are tested), then run
# tests/python/test_client.py (numpy only) and test_client_layout.py (the
# ctypes structures against the header, through tests/python_layout).
# With MOED_PY_SUITE=torch (tests/python_client_torch.sh) it runs
# test_client_torch.py instead, with a Python that has torch.
#
# The package is used in-tree (PYTHONPATH=$top_srcdir/python) with
# MOED_LIBRARY at the libmoeclient just built.
#
# Python: numpy suite: $PYTHON (configure's) if it has numpy, else
# /usr/bin/python3 if it has; torch suite: $MOED_TEST_PYTHON, else
# the venv ./bootstrap.sh check makes ($top_builddir/venv), else whichever
# of those has torch.  None: skip (77), saying why.
#
# Environment: MOECTL, MOED, top_builddir, top_srcdir (from make check).
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"
suite=${MOED_PY_SUITE:-numpy}

# has_modules PY MOD...: PY runs and imports every MOD
has_modules() {
	py=$1
	shift
	[ -n "$py" ] && [ "$py" != ":" ] || return 1
	for m in "$@"; do
		"$py" -c "import $m" >/dev/null 2>&1 || return 1
	done
}

PY=
case $suite in
numpy)
	for cand in "${PYTHON:-}" /usr/bin/python3; do
		if has_modules "$cand" numpy; then PY=$cand; break; fi
	done
	[ -n "$PY" ] || skip "no Python with numpy (tried \$PYTHON='${PYTHON:-}' and /usr/bin/python3): apt-get install python3-numpy"
	;;
torch)
	if [ -n "${MOED_TEST_PYTHON:-}" ]; then
		has_modules "$MOED_TEST_PYTHON" numpy torch ||
			skip "MOED_TEST_PYTHON=$MOED_TEST_PYTHON lacks numpy or torch"
		PY=$MOED_TEST_PYTHON
	else
		for cand in "${top_builddir:-.}/venv/bin/python" "${PYTHON:-}" /usr/bin/python3; do
			if has_modules "$cand" numpy torch; then PY=$cand; break; fi
		done
		[ -n "$PY" ] || skip "no Python with torch: set MOED_TEST_PYTHON to one (see python/README.md)"
	fi
	;;
*)
	fail "MOED_PY_SUITE=$suite: numpy or torch"
	;;
esac

LIB=${top_builddir:-.}/libmoeclient/.libs/libmoeclient.so.0
[ -f "$LIB" ] || fail "no $LIB: build libmoeclient first"

trap moed_stop EXIT

# A qwen2_moe model (it has a shared expert): 2 MoE layers of 8 experts, top 2.
gen_model "$T/hf" --arch qwen2_moe --layers 2 --hidden 64 --moe-intermediate 32 --experts 8 \
	--top-k 2 --vocab 64 --seed 11
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
SOCK=$T/moed.sock
LOG=$T/moed.log
cat >"$T/moed.conf" <<CONF
# moed.conf of tests/python_client.sh
model = "$T/m.moe";
backend = "cpu";
cache = { host_mb = 64; };
limits = { max_tokens_per_request = 16; };
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
log = { level = "info"; };
CONF
moed_start "$T/moed.conf" "$SOCK" "$LOG"

PYTHONPATH=${top_srcdir:-.}/python${PYTHONPATH:+:$PYTHONPATH}
MOED_LIBRARY=$LIB
asan_preload "$LIB"
MOED_TEST_SOCKET=$SOCK
MOED_TEST_STORE=$T/m.moe
MOED_TEST_CHECKPOINT=$T/hf
MOED_TEST_TMP=$T
MOED_TEST_MAX_TOKENS=16
export PYTHONPATH MOED_LIBRARY MOED_TEST_SOCKET MOED_TEST_STORE MOED_TEST_CHECKPOINT MOED_TEST_TMP \
	MOED_TEST_MAX_TOKENS MOECTL
unset MOED_SOCKET
# no __pycache__ in the source tree (read-only under make distcheck)
PYTHONDONTWRITEBYTECODE=1
export PYTHONDONTWRITEBYTECODE

echo "python: $PY ($("$PY" -c 'import sys, numpy; print(sys.version.split()[0], "numpy", numpy.__version__)'))"
status=0
case $suite in
numpy)
	LAYOUT=${top_builddir:-.}/tests/python_layout
	[ -x "$LAYOUT" ] || fail "no $LAYOUT (make check builds it)"
	"$LAYOUT" >"$T/layout.txt" || fail "$LAYOUT failed"
	MOED_TEST_LAYOUT=$T/layout.txt "$PY" "${top_srcdir:-.}/tests/python/test_client_layout.py" -v || status=1
	"$PY" "${top_srcdir:-.}/tests/python/test_client.py" -v || status=1
	;;
torch)
	"$PY" "${top_srcdir:-.}/tests/python/test_client_torch.py" -v || status=1
	;;
esac
[ "$status" -eq 0 ] || { LAST_CMD=; fail "the Python tests failed (moed's log: $LOG)"; }
kill -0 "$MOED_PID" 2>/dev/null || fail "moed died during the tests: $(cat "$LOG")"
moed_term "$MOED_PID" "$LOG"
MOED_PID=
exit 0
