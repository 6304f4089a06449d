# SPDX-License-Identifier: MIT
# Helpers for the shell tests (POSIX sh).  Source it first:
#
#	. "${top_srcdir:-.}/tests/lib.sh"
#
# It checks $MOECTL (skips the test, exit 77, when the binary is missing),
# makes a temporary directory $T removed at exit (kept when MOE_TEST_KEEP is
# set), and gives:
#
#	fail MSG...          print "FAIL: MSG" on stderr and exit 1
#	skip MSG...          print "SKIP: MSG" and exit 77
#	run CMD...           run CMD, its stdout in $T/out, stderr in $T/err,
#	                     exit status in $rc; a crash (status >= 128) fails
#	expect_ok CMD...     run CMD; fail unless it exits 0
#	expect_fail CMD...   run CMD; fail unless it exits non-zero without a
#	                     crash and says something on stderr
#	expect_msg PATTERN   fail unless the last command's stderr matches the
#	                     extended regular expression PATTERN
#	expect_out PATTERN   the same for its stdout
#	expect_one_line      fail unless the last command's stderr is one line
#	gen_model DIR ARGS.. moectl gen-model ARGS -o DIR, failing on error
#	wait_for PATTERN FILE [SECONDS]
#	                     wait until a line of FILE matches the extended
#	                     regular expression PATTERN (default 10 s), failing
#	                     with FILE's text after that
#	moed_term PID LOG    SIGTERM moed PID, wait for it, fail (with LOG) unless
#	                     it exits 0
#	tsan_build           true in a ThreadSanitizer build (configure --enable-tsan)
#
# Exit status: 0 pass, 1 fail, 77 skip (automake's convention).


: "${MOECTL:=${top_builddir:-.}/client/moectl}"
if [ ! -x "$MOECTL" ]; then
	echo "SKIP: moectl not found at $MOECTL" >&2
	exit 77
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/moe-sh.XXXXXX") || exit 1
moe_cleanup() {
	if [ -n "${MOE_TEST_KEEP:-}" ]; then
		echo "kept $T" >&2
	else
		rm -rf "$T"
	fi
}
trap moe_cleanup EXIT
trap 'exit 1' INT TERM HUP

LAST_CMD=

fail() {
	echo "FAIL: $*" >&2
	if [ -n "$LAST_CMD" ] && [ -f "$T/err" ]; then
		echo "  last command: $LAST_CMD (exit $rc)" >&2
		sed 's/^/  stderr: /' "$T/err" >&2
	fi
	exit 1
}

skip() {
	echo "SKIP: $*" >&2
	exit 77
}

run() {
	LAST_CMD="$*"
	rc=0
	"$@" >"$T/out" 2>"$T/err" || rc=$?
	if [ "$rc" -ge 128 ]; then
		fail "crashed (exit $rc): $*"
	fi
	return 0
}

expect_ok() {
	run "$@"
	[ "$rc" -eq 0 ] || fail "expected success: $*"
}

expect_fail() {
	run "$@"
	[ "$rc" -ne 0 ] || fail "expected failure: $*"
	[ -s "$T/err" ] || fail "failed without a message on stderr: $*"
}

expect_msg() {
	grep -Eq -- "$1" "$T/err" || fail "stderr does not match '$1'"
}

expect_out() {
	grep -Eq -- "$1" "$T/out" || fail "stdout does not match '$1'"
}

expect_one_line() {
	n=$(wc -l <"$T/err")
	[ "$n" -eq 1 ] || fail "expected one line on stderr, got $n"
}

gen_model() {
	dir=$1
	shift
	"$MOECTL" gen-model "$@" -o "$dir" >"$T/gen.out" 2>&1 ||
		{ cat "$T/gen.out" >&2; fail "gen-model $* -o $dir"; }
}

wait_for() {
	n=$(( ${3:-10} * 10 ))
	while ! grep -Eq -- "$1" "$2" 2>/dev/null; do
		n=$(( n - 1 ))
		[ "$n" -gt 0 ] || fail "no '$1' in $2 after ${3:-10} s:
$(cat "$2" 2>/dev/null)"
		sleep 0.1
	done
}

# moed_start CONF SOCK LOG: moed on CONF in the background (its pid in
# MOED_PID, its stderr in LOG), once it answers on SOCK; a test that uses it
# sets `trap moed_stop EXIT` so that no moed outlives the test.
MOED_PID=
moed_start() {
	"$MOED" --config "$1" 2>"$3" &
	MOED_PID=$!
	n=0
	while ! "$MOECTL" --socket "$2" info >/dev/null 2>&1; do
		n=$(( n + 1 ))
		[ "$n" -lt 100 ] || fail "moed does not answer on $2: $(cat "$3")"
		kill -0 "$MOED_PID" 2>/dev/null || fail "moed exited: $(cat "$3")"
		sleep 0.1
	done
}

moed_stop() {
	[ -z "$MOED_PID" ] || { kill "$MOED_PID" 2>/dev/null && sleep 0.2 && kill -9 "$MOED_PID" 2>/dev/null; }
	moe_cleanup
}

# asan_preload LIB: where LIB comes from an ASan build (configure
# --enable-asan), a program built without ASan (python) loads it only with
# the ASan runtime first in the process: preload it, without leak reports
# (that program's own allocations are not ours to check).  A no-op for
# other builds.
asan_preload() {
	# ThreadSanitizer's runtime cannot be preloaded the same way: python
	# passes LD_PRELOAD on to the shells it starts (moectl's libtool
	# wrapper), which it crashes.  check_client covers libmoeclient there.
	if ldd "$1" 2>/dev/null | grep -q 'libtsan\.so'; then
		skip "a ThreadSanitizer build (configure --enable-tsan): the Python tests run in the other builds"
	fi
	rt=$(ldd "$1" 2>/dev/null | awk '/libasan\.so/ { print $3; exit }')
	[ -n "$rt" ] || return 0
	LD_PRELOAD=$rt${LD_PRELOAD:+:$LD_PRELOAD}
	ASAN_OPTIONS=detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}
	export LD_PRELOAD ASAN_OPTIONS
}

# tsan_build: whether the programs under test are a ThreadSanitizer build,
# whose memory use (shadow memory) says nothing about moed's
tsan_build() {
	for b in "${top_builddir:-.}/client/.libs/moectl" "$MOECTL"; do
		[ -x "$b" ] && ldd "$b" 2>/dev/null | grep -q 'libtsan\.so' && return 0
	done
	return 1
}

moed_term() {
	kill -TERM "$1"
	moed_term_rc=0
	wait "$1" || moed_term_rc=$?
	[ "$moed_term_rc" -eq 0 ] || fail "moed exited $moed_term_rc on SIGTERM: $(cat "$2")"
}
