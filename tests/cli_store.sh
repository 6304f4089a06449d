#!/bin/sh
# SPDX-License-Identifier: MIT
#
# A store that changes under a running moed (issue 13: finding 3b, Deliver
# 4 and 5), through the daemon as a user sees it:
#  - the store truncated (its last expert gone): requests that need that
#    expert fail, the others get the same bits as in process; the log says
#    so in one line however many requests fail; `moectl stats` shows the
#    state "changed" and the failed reads;
#  - SIGHUP while it is still short: the reopen is refused by name;
#  - written whole again and SIGHUP: the state is ok and the request that
#    failed gets the same bits as in process;
#  - store.verify = "open": a store with one flipped byte in an expert is
#    refused at start with a line naming layer and expert; with "off" moed
#    serves it, the requests that need that expert fail (a checksum
#    mismatch) and the others do not, and after 4 failures the store is
#    "damaged", said in one line and in stats.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"

NL_PID=
trap 'moed_stop; [ -z "$NL_PID" ] || kill "$NL_PID" 2>/dev/null' EXIT

gen_model "$T/hf" --arch qwen3_moe --layers 2 --hidden 256 --moe-intermediate 64 --experts 8 \
	--top-k 2 --vocab 64
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
cp "$T/m.moe" "$T/whole.moe"
# the last expert of the last MoE layer is the file's last expert_stride bytes
L=1
X=7
stride=$(od -An -t u8 -j 160 -N 8 "$T/m.moe" | tr -d ' ')
size=$(wc -c <"$T/m.moe")

# seeds: A routes its token to expert X of layer L, B does not
A=
B=
seed=1
while [ -z "$A" ] || [ -z "$B" ]; do
	[ "$seed" -le 200 ] || fail "no seeds with and without expert $X in 200"
	expect_ok "$MOECTL" forward --model "$T/m.moe" --layer $L --random-input 1 --seed $seed --stats
	if grep -q "^  expert $X |#" "$T/out"; then
		[ -n "$A" ] || A=$seed
	else
		[ -n "$B" ] || B=$seed
	fi
	seed=$(( seed + 1 ))
done
for s in "$A" "$B"; do
	expect_ok "$MOECTL" forward --model "$T/m.moe" --layer $L --random-input 1 --seed "$s" \
		--output "$T/want$s.npy"
done

SOCK=$T/moed.sock
LOG=$T/moed.log
write_conf() {
	cat >"$T/moed.conf" <<EOC
model = "$1";
backend = "cpu";
cache = { host_mb = 64; };
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
store = { verify = "$2"; };
log = { level = "info"; };
EOC
}
# the notify STATUS too, where moed has sd_notify and the stand-in is built
NOTIFY_LISTEN=${top_builddir:-.}/tests/notify_listen
NOTES=
if grep -q 'HAVE_SYSTEMD 1' "${top_builddir:-.}/config.h" 2>/dev/null && [ -x "$NOTIFY_LISTEN" ]; then
	NOTES=$T/notify.txt
	"$NOTIFY_LISTEN" "$T/notify.sock" 120 >"$NOTES" &
	NL_PID=$!
	n=0
	while [ ! -S "$T/notify.sock" ]; do
		n=$(( n + 1 ))
		[ "$n" -lt 50 ] || fail "notify_listen did not bind $T/notify.sock"
		sleep 0.1
	done
	NOTIFY_SOCKET=$T/notify.sock
	export NOTIFY_SOCKET
else
	echo "no sd_notify here: not checking the STATUS line" >&2
fi
write_conf "$T/m.moe" off
moed_start "$T/moed.conf" "$SOCK" "$LOG"
fwd() {
	run "$MOECTL" --socket "$SOCK" forward --layer $L --random-input 1 --seed "$1" --output "$T/got.npy"
}

# ---- truncated under moed ----------------------------------------------------------
truncate -s $(( size - stride )) "$T/m.moe" || fail "truncate"
i=0
while [ $i -lt 20 ]; do
	fwd "$A"
	[ "$rc" -ne 0 ] || fail "a request that needs the lost expert succeeded"
	expect_msg 'Input/output error'       # EIO, as moe_client_forward(3) says
	fwd "$B"
	[ "$rc" -eq 0 ] || fail "a request that does not need the lost expert failed"
	cmp -s "$T/got.npy" "$T/want$B.npy" || fail "moed's output differs from the in-process run's"
	i=$(( i + 1 ))
done
n=$(grep -c 'moed: error: ' "$LOG")
[ "$n" -eq 1 ] || fail "$n error lines for 20 failed requests, want 1: $(cat "$LOG")"
grep 'moed: error: ' "$LOG" | grep "$T/m.moe" | grep -q 'changed under moed' ||
	fail "the line does not say the store changed: $(cat "$LOG")"
expect_ok "$MOECTL" --socket "$SOCK" stats
expect_out '^store: changed, [1-9][0-9]* failed reads, 0 checksum mismatches, 0 reopens: .*truncated'
expect_ok "$MOECTL" --socket "$SOCK" stats --json
# moectl's JSON is indented (one style for every --json): read it flat
tr -d ' \n' <"$T/out" | grep -Eq '"store":\{"state":"changed","read_errors":[1-9]' ||
	fail "stats --json does not say the store changed: $(cat "$T/out")"
[ -z "$NOTES" ] || wait_for '^STATUS=Serving .*; store changed: .*truncated' "$NOTES" 3

# ---- SIGHUP while still short: refused -----------------------------------------------
kill -HUP "$MOED_PID"
wait_for 'cannot be reopened.*truncated store' "$LOG"
fwd "$A"
[ "$rc" -ne 0 ] || fail "a request that needs the lost expert succeeded after a refused reopen"

# ---- whole again, SIGHUP: ok, the same bits ------------------------------------------
cat "$T/whole.moe" >"$T/m.moe"
kill -HUP "$MOED_PID"
wait_for 'is whole again' "$LOG"
fwd "$A"
[ "$rc" -eq 0 ] || fail "the request that failed fails after the reopen: $(cat "$T/err")"
cmp -s "$T/got.npy" "$T/want$A.npy" || fail "after the reopen moed's output differs from the in-process run's"
expect_ok "$MOECTL" --socket "$SOCK" stats
expect_out '^store: ok, [1-9][0-9]* failed reads, 0 checksum mismatches, 1 reopens$'
if [ -n "$NOTES" ]; then
	sleep 1.5       # a status tick after the reopen
	grep '^STATUS=' "$NOTES" | tail -n 1 | grep -q '; store ' && fail "STATUS still names the store: $(tail -n 3 "$NOTES")"
fi
unset NOTIFY_SOCKET
moed_term "$MOED_PID" "$LOG"
MOED_PID=

# ---- store.verify = "open": a flipped byte in expert 3 of layer 0 ----------------------
lto=$(od -An -t u8 -j 168 -N 8 "$T/m.moe" | tr -d ' ')
eo=$(od -An -t u8 -j $(( lto + 56 )) -N 8 "$T/m.moe" | tr -d ' ')
off=$(( eo + 3 * stride + 100 ))
b=$(od -An -t u1 -j $off -N 1 "$T/m.moe" | tr -d ' ')
# shellcheck disable=SC2059
printf "\\$(printf %o $(( b ^ 90 )))" | dd of="$T/m.moe" bs=1 seek=$off conv=notrunc 2>/dev/null
write_conf "$T/m.moe" open
run timeout 60 "$MOED" --config "$T/moed.conf"
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "moed served a damaged store with store.verify = \"open\" (exit $rc)"
expect_msg 'layer 0 expert 3: checksum mismatch'
expect_msg 'moectl verify'

# ---- the same store with store.verify = "off": moed serves it; requests that
# need expert 3 of layer 0 fail (a checksum mismatch, through the daemon),
# others do not; after 4 the store is "damaged", said once, and the
# failures after it add no error line
C=
D=
seed=1
while [ -z "$C" ] || [ -z "$D" ]; do
	[ "$seed" -le 200 ] || fail "no seeds with and without expert 3 of layer 0 in 200"
	expect_ok "$MOECTL" forward --model "$T/whole.moe" --layer 0 --random-input 1 --seed $seed --stats
	if grep -q "^  expert 3 |#" "$T/out"; then
		[ -n "$C" ] || C=$seed
	else
		[ -n "$D" ] || D=$seed
	fi
	seed=$(( seed + 1 ))
done
expect_ok "$MOECTL" forward --model "$T/whole.moe" --layer 0 --random-input 1 --seed "$D" --output "$T/wantD.npy"
write_conf "$T/m.moe" off
moed_start "$T/moed.conf" "$SOCK" "$LOG"
L=0
i=0
while [ $i -lt 8 ]; do
	fwd "$C"
	[ "$rc" -ne 0 ] || fail "a request that needs the damaged expert succeeded"
	# a checksum mismatch reaches the client as such (MOE_E_CHECKSUM), not
	# as an I/O error; moectl's status for it is 5 (moectl(1))
	expect_msg 'Expert weights failed their checksum'
	[ "$rc" -eq 5 ] || fail "moectl exit $rc for a checksum mismatch, not 5: $(cat "$T/err")"
	fwd "$D"
	[ "$rc" -eq 0 ] || fail "a request that does not need the damaged expert failed"
	cmp -s "$T/got.npy" "$T/wantD.npy" || fail "moed's output differs from the in-process run's"
	i=$(( i + 1 ))
	[ $i -ne 4 ] || n4=$(grep -c 'moed: error: ' "$LOG")
done
[ "$(grep -c 'the store is damaged' "$LOG")" -eq 1 ] || fail "not one line says the store is damaged: $(cat "$LOG")"
[ "$(grep -c 'moed: error: ' "$LOG")" -eq "$n4" ] || fail "failures after 'damaged' are still error lines: $(cat "$LOG")"
expect_ok "$MOECTL" --socket "$SOCK" stats
expect_out '^store: damaged, 0 failed reads, 8 checksum mismatches, 0 reopens: .*layer 0 expert 3'
moed_term "$MOED_PID" "$LOG"
MOED_PID=
exit 0
