#!/bin/sh
# SPDX-License-Identifier: MIT
#
# bench_soak (bench/run-soak's driver) for a few seconds, so that the soak
# keeps working between the long runs: a real moed paging a small store
# through a 1 MiB host cache, two well-behaved clients, the stalling one
# and the hostile one.  It must pass (every answer right, no unexpected
# error, moed alive, its descriptors given back) and print its table; and
# with the clients' in-process engine on another store of the same shape
# it must fail, naming a wrong result, which shows that the check compares.
# moed's idle CPU is not checked here (a timing: bench/run-soak checks it).
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

SOAK=${top_builddir:-.}/bench/bench_soak
[ -x "$SOAK" ] || skip "bench_soak not built at $SOAK"
[ -d /proc/self/fd ] || skip "no /proc: bench_soak reads moed's figures there"

# 2 MoE layers (and a dense one) of 16 experts of 128 x 64: about 1.6 MB,
# well beyond a 1 MiB cache with its fixed part
args="--arch deepseek_v3 --layers 3 --first-dense 1 --mtp-layers 0 --hidden 128 --intermediate 256
	--moe-intermediate 64 --experts 16 --groups 4 --topk-group 2 --top-k 4 --shared-experts 1 --vocab 32"
# shellcheck disable=SC2086
gen_model "$T/hf" $args --seed 7
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
# shellcheck disable=SC2086
gen_model "$T/hf2" $args --seed 8
expect_ok "$MOECTL" pack "$T/hf2" -o "$T/other.moe"

# one uid runs every client: where moed limits each uid (issue 13's
# admission), this one may hold every session and connect them all at once
admission=
conf() {
	cat >"$T/moed.conf" <<EOF
model = "$T/m.moe";
backend = "cpu";
socket = { path = "$T/s.sock"; group = ""; };
cache = { host_mb = 1; };
limits = { max_clients = 16; segment_mb = 4; $admission };
log = { level = "warning"; };
EOF
}
conf
expect_ok "$MOED" --check-config --config "$T/moed.conf"
! grep -q '^limits.max_clients_per_uid ' "$T/out" || admission="max_clients_per_uid = 16;"
! grep -q '^limits.max_pending_per_uid ' "$T/out" || admission="$admission max_pending_per_uid = 16;"
conf
moed_start "$T/moed.conf" "$T/s.sock" "$T/moed.log"
trap moed_stop EXIT

soak() {
	run "$SOAK" --socket "$T/s.sock" --pid "$MOED_PID" --clients 2 --interval 1 --stall 0.5 --idle 0.3 \
		--max-tokens 16 --max-idle-cpu off "$@"
}

soak --store "$T/m.moe" --duration 2
[ "$rc" -eq 0 ] || { cat "$T/out" >&2; fail "bench_soak failed on a healthy moed (exit $rc)"; }
expect_out '^\| wrong results \| 0 \|$'
expect_out '^\| verdict \| PASS \|$'
# it did check requests, stall and attack, and moed paged
grep -Eq '^\| requests checked bit for bit \| [1-9][0-9]* ' "$T/out" || fail "no request was checked: $(cat "$T/out")"
grep -Eq '^\| stalls: rings full / SIGSTOP \| [1-9][0-9]* / ' "$T/out" ||
	fail "the client never stalled: $(cat "$T/out")"
grep -Eq '^\| hostile: refused [^|]*\| [1-9][0-9]* / [0-9]+ / [0-9]+ / 0 \|$' "$T/out" ||
	fail "no hostile action was refused: $(cat "$T/out")"
grep -Eq 'host-cache hit rate [^|]*\| [0-9]+ / [0-9]+ / [1-9][0-9]* /' "$T/out" ||
	fail "moed loaded no expert from the store: $(cat "$T/out")"

soak --store "$T/other.moe" --duration 1
[ "$rc" -eq 1 ] || fail "bench_soak exited $rc, not 1, when every answer differs from its reference"
grep -q 'WRONG RESULT' "$T/err" || fail "bench_soak did not name a wrong result: $(cat "$T/err")"
grep -Eq '^\| wrong results \| [1-9]' "$T/out" || fail "no wrong result counted: $(cat "$T/out")"

kill -0 "$MOED_PID" 2>/dev/null || fail "moed died: $(cat "$T/moed.log")"
moed_term "$MOED_PID" "$T/moed.log"
MOED_PID=
exit 0
