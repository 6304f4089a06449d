#!/bin/sh
# SPDX-License-Identifier: MIT
# moectl pack leaves a whole store or none (issue 13, finding 5): two packs
# to one output both end with a whole store there, a signal mid-pack leaves
# no temporary and a failing exit, and a file that happens to be called
# STORE.tmp is somebody else's.  Both ways of making the temporary are
# tested: O_TMPFILE (no name until the rename) and the named one of
# filesystems without it (MOE_OUTFILE_NAMED=1 forces it).
#
# MOECTL_PACK_TEST_STALL=S makes pack sleep S seconds once, after its first
# part is written, and say "stalled for a test": the overlap of two packs
# and the moment of a signal are then certain, not a race the test may lose.
. "${top_srcdir:-.}/tests/lib.sh"

export LC_ALL=C

# A background job of a script starts with SIGINT ignored, which pack keeps
# (as nohup expects of it), and sh cannot undo: a Python puts it back.
py=
for c in "${PYTHON:-}" /usr/bin/python3 python3; do
	if [ -n "$c" ] && "$c" -c 'import signal' 2>/dev/null; then
		py=$c
		break
	fi
done
with_sigint() {
	exec "$py" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}
sigs="INT TERM"
[ -n "$py" ] || { sigs=TERM; echo "note: no Python to run pack with SIGINT caught: SIGTERM only"; }

# no pack outlives a failing test
p= p1= p2=
trap 'kill $p $p1 $p2 2>/dev/null; moe_cleanup' EXIT

gen_model "$T/a" --arch qwen3_moe --seed 1
gen_model "$T/b" --arch qwen3_moe --seed 2

# the temporaries of x.moe in DIR, one a line
temps() { ls -A "$1" | grep '^\.x\.moe\.' || true; }

# whether process PID holds an unnamed file of DIR open (O_TMPFILE)
holds_unnamed() {
	for fd in /proc/"$1"/fd/*; do
		case $(readlink "$fd" 2>/dev/null) in
		"$2"/\#*" (deleted)") return 0 ;;
		esac
	done
	return 1
}

for mode in tmpfile named; do
	if [ "$mode" = named ]; then
		MOE_OUTFILE_NAMED=1
		export MOE_OUTFILE_NAMED
	else
		unset MOE_OUTFILE_NAMED
	fi
	D=$T/$mode
	mkdir "$D"
	printf 'somebody else' >"$D/x.moe.tmp"

	# --- two packs, one output: both whole, both exit 0 ------------------------
	for i in 1 2 3; do
		MOECTL_PACK_TEST_STALL=1 "$MOECTL" pack "$T/a" -o "$D/x.moe" >"$T/p1.out" 2>&1 &
		p1=$!
		MOECTL_PACK_TEST_STALL=1 "$MOECTL" pack "$T/b" -o "$D/x.moe" >"$T/p2.out" 2>&1 &
		p2=$!
		rc1=0
		wait "$p1" || rc1=$?
		rc2=0
		wait "$p2" || rc2=$?
		grep -q 'stalled for a test' "$T/p1.out" && grep -q 'stalled for a test' "$T/p2.out" ||
			fail "$mode: a pack did not stall: the packs may not have overlapped"
		expect_ok "$MOECTL" verify "$D/x.moe"
		# the store is whole, so neither may have failed
		[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ] ||
			fail "$mode, round $i: pack exits $rc1 and $rc2 for a whole store:
$(cat "$T/p1.out" "$T/p2.out")"
		# and it is one of the two, not a mix
		expect_ok "$MOECTL" inspect "$D/x.moe"
		grep -Eq "$T/(a|b)" "$T/out" || fail "$mode: the store's source is neither checkpoint: $(cat "$T/out")"
		[ -z "$(temps "$D")" ] || fail "$mode: temporaries left: $(temps "$D")"
		[ "$(cat "$D/x.moe.tmp")" = "somebody else" ] || fail "$mode: pack wrote to $D/x.moe.tmp"
	done
	rm -f "$D/x.moe"

	# --- a signal mid-pack: no temporary, no store, a failing exit ---------------
	for sig in $sigs; do
		# the redirection happens in the background child: without this,
		# wait_for could read the last round's line before it truncates
		rm -f "$T/sig.out"
		if [ "$sig" = INT ]; then
			MOECTL_PACK_TEST_STALL=60 with_sigint "$MOECTL" pack "$T/a" -o "$D/x.moe" >"$T/sig.out" 2>&1 &
		else
			MOECTL_PACK_TEST_STALL=60 "$MOECTL" pack "$T/a" -o "$D/x.moe" >"$T/sig.out" 2>&1 &
		fi
		p=$!
		wait_for 'stalled for a test' "$T/sig.out"
		# the temporary exists now, so its absence later means something
		if [ "$mode" = named ]; then
			[ -n "$(temps "$D")" ] || fail "named: no temporary while pack writes"
		elif ! holds_unnamed "$p" "$D"; then
			[ -n "$(temps "$D")" ] || fail "tmpfile: pack holds no file of $D"
			echo "note: $D has no O_TMPFILE: pack fell back to a named temporary"
		fi
		kill -s "$sig" "$p"
		rc=0
		wait "$p" || rc=$?
		if [ "$sig" = INT ]; then want=130; else want=143; fi
		[ "$rc" -eq "$want" ] || fail "$mode: SIG$sig mid-pack: exit $rc, expected $want (killed by it)"
		[ -z "$(temps "$D")" ] || fail "$mode: SIG$sig mid-pack left $(temps "$D")"
		[ ! -e "$D/x.moe" ] || fail "$mode: SIG$sig mid-pack left a store"
	done
	[ "$(cat "$D/x.moe.tmp")" = "somebody else" ] || fail "$mode: pack wrote to $D/x.moe.tmp"
done

# SIGKILL cannot be caught: an unnamed temporary goes with the process
unset MOE_OUTFILE_NAMED
D=$T/tmpfile
rm -f "$T/sig.out"
MOECTL_PACK_TEST_STALL=60 "$MOECTL" pack "$T/a" -o "$D/x.moe" >"$T/sig.out" 2>&1 &
p=$!
wait_for 'stalled for a test' "$T/sig.out"
if holds_unnamed "$p" "$D"; then
	kill -s KILL "$p"
	wait "$p" || true
	[ -z "$(temps "$D")" ] && [ ! -e "$D/x.moe" ] || fail "SIGKILL mid-pack left $(ls -A "$D")"
else
	kill -s TERM "$p"
	wait "$p" || true
	echo "note: $D has no O_TMPFILE: SIGKILL would leave a named temporary"
fi
echo "pack: concurrent packs whole, signals leave nothing"
