#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moed on the CUDA backend; skipped (exit 77) unless `moectl forward --model
# STORE --backend cuda` runs, i.e. there is a usable device.  A deepseek_v3
# model (groups, correction bias, a shared expert; two MoE layers of 32
# experts of 0.75 MiB) and moed with backend cuda, a host budget of 8 of
# those experts and a device budget of 8 MiB:
#  - moectl info through moed names the cuda backend;
#  - every request through moed (moectl --socket S forward) gives the bits,
#    output and routing (--routing-out), of `moectl forward --model STORE
#    --backend cuda` with no budget, for both MoE layers and batches of
#    1000, 300, 64, 7 and 1 tokens, in an order that makes moed evict and
#    read experts from the store again, and a second time round;
#  - every MoE layer in turn (--layer all) gives the bits of --model;
#  - tests/gpu_client: hidden states in GPU memory (moe_client_forward_cuda)
#    give the bits of the same tokens from host memory;
#  - four clients at once with small requests, whose tokens moed may batch
#    together (a batch window of 2 ms): each gets the bits of its own
#    request run alone;
#  - moed evicted experts (moectl stats), logged no error, and exits 0 on
#    SIGTERM.
#
# MOE_GPU_TEST_BACKEND=cpu runs it all on the CPU backend: a check of this
# script on a machine without a device.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"
BE=${MOE_GPU_TEST_BACKEND:-cuda}

# moed is stopped at exit; after a failure the end of its log is shown
MOED_PID=
LOG=$T/moed.log
stop_all() {
	st=$?
	if [ -n "$MOED_PID" ]; then
		kill "$MOED_PID" 2>/dev/null && sleep 0.5 && kill -9 "$MOED_PID" 2>/dev/null
	fi
	if [ "$st" -ne 0 ] && [ "$st" -ne 77 ] && [ -s "$LOG" ]; then
		echo "the end of moed's log:" >&2
		tail -n 30 "$LOG" | sed 's/^/  /' >&2
	fi
	moe_cleanup
}
trap stop_all EXIT

# ---- a model, and whether the backend runs here ----------------------------------------
gen_model "$T/hf" --arch deepseek_v3 --layers 3 --first-dense 1 --hidden 512 --moe-intermediate 256 \
	--experts 32 --top-k 4 --groups 4 --topk-group 2 --shared-experts 1 --vocab 64 --seed 11
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"

run "$MOECTL" forward --model "$T/m.moe" --backend "$BE" --layer 1 --random-input 1 --output "$T/probe.npy"
[ "$rc" -eq 0 ] || skip "moectl forward --backend $BE does not run here: $(head -n 1 "$T/err")"

LAYERS="1 2"
SIZES="1000 1 300 7 64"

# ---- the reference: in-process, every expert resident ------------------------------------
for layer in $LAYERS; do
	for n in $SIZES; do
		expect_ok "$MOECTL" forward --model "$T/m.moe" --backend "$BE" --layer "$layer" \
			--random-input "$n" --seed $(( layer * 10000 + n )) --save-input "$T/in-$layer-$n.npy" \
			--output "$T/want-$layer-$n.npy" --routing-out "$T/want-$layer-$n.npz"
	done
done
expect_ok "$MOECTL" forward --model "$T/m.moe" --backend "$BE" --layer all --random-input 64 --seed 5 \
	--save-input "$T/in-all.npy" --output "$T/want-all.npy"

# ---- moed with small budgets ---------------------------------------------------------------
SOCK=$T/moed.sock
cat >"$T/moed.conf" <<EOF
# moed.conf of tests/gpu_daemon.sh
model = "$T/m.moe";
backend = "$BE";
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
cache = { host_mb = 8; gpu_mb = 8; policy = "auto"; };
pager = { prefetch = true; };
batch = { window_us = 2000; };
log = { level = "info"; };
EOF
"$MOED" --config "$T/moed.conf" >"$LOG" 2>&1 &
MOED_PID=$!
n=0
until "$MOECTL" --socket "$SOCK" info >"$T/out" 2>"$T/err"; do
	kill -0 "$MOED_PID" 2>/dev/null || { MOED_PID=; fail "moed exited at start: $(cat "$LOG")"; }
	n=$(( n + 1 ))
	[ "$n" -lt 300 ] || fail "moed does not answer on $SOCK after 30 s: $(cat "$LOG")"
	sleep 0.1
done
LAST_CMD="$MOECTL --socket $SOCK info"
expect_out "backend $BE,"

# ---- one client: largest batches first, the layers in turn, twice -------------------------
for pass in 1 2; do
	for n in $SIZES; do
		for layer in $LAYERS; do
			expect_ok "$MOECTL" --socket "$SOCK" forward --layer "$layer" --input "$T/in-$layer-$n.npy" \
				--output "$T/got.npy" --routing-out "$T/got.npz"
			cmp -s "$T/want-$layer-$n.npy" "$T/got.npy" ||
				fail "through moed (round $pass), layer $layer, $n tokens: the output bits differ from moectl forward --model --backend $BE"
			cmp -s "$T/want-$layer-$n.npz" "$T/got.npz" ||
				fail "through moed (round $pass), layer $layer, $n tokens: the routing differs from moectl forward --model --backend $BE"
		done
	done
done
expect_ok "$MOECTL" --socket "$SOCK" forward --layer all --input "$T/in-all.npy" --output "$T/got.npy"
cmp -s "$T/want-all.npy" "$T/got.npy" ||
	fail "through moed, every layer in turn: the output bits differ from moectl forward --model --backend $BE"

# ---- hidden states in GPU memory (moe_client_forward_cuda) ------------------------------------
GPU_CLIENT=${top_builddir:-.}/tests/gpu_client
if [ "$BE" = cuda ] && [ -x "$GPU_CLIENT" ]; then
	expect_ok "$GPU_CLIENT" "$SOCK"
fi

# ---- four clients at once -----------------------------------------------------------------
# client i: layer, tokens.  Small requests: the CUDA backend is batch
# invariant while each expert of a batch has fewer than 64 tokens (above,
# cuBLAS products, whose bits depend on their size: moed(8)).
CLIENTS="1:7 2:1 1:1 2:7"
for round in 1 2 3; do
	pids=
	i=0
	for c in $CLIENTS; do
		i=$(( i + 1 ))
		"$MOECTL" --socket "$SOCK" forward --layer "${c%%:*}" --input "$T/in-${c%%:*}-${c##*:}.npy" \
			--output "$T/c$i.npy" >"$T/c$i.out" 2>"$T/c$i.err" &
		pids="$pids $!"
	done
	i=0
	for p in $pids; do
		i=$(( i + 1 ))
		crc=0
		wait "$p" || crc=$?
		[ "$crc" -eq 0 ] || fail "concurrent client $i (round $round) exited $crc: $(cat "$T/c$i.err")"
	done
	i=0
	for c in $CLIENTS; do
		i=$(( i + 1 ))
		cmp -s "$T/want-${c%%:*}-${c##*:}.npy" "$T/c$i.npy" ||
			fail "concurrent client $i (round $round), layer ${c%%:*}, ${c##*:} tokens: the output bits differ from the request run alone"
	done
done

# ---- what moed did ---------------------------------------------------------------------------
expect_ok "$MOECTL" --socket "$SOCK" stats --json
evictions=$(grep -o '"evictions":[0-9]*' "$T/out" | sed 's/.*://' | sort -n | tail -n 1)
[ "${evictions:-0}" -gt 0 ] || fail "moed evicted nothing with host_mb = 8: the checks above prove little"
errors=$(grep -o '"errors":[0-9]*' "$T/out" | head -n 1 | sed 's/.*://')
[ "${errors:-1}" -eq 0 ] || fail "moed counts $errors failed requests"
! grep -Eq '(^|Z )moed: (emerg|alert|crit|error):' "$LOG" || fail "moed logged errors: $(cat "$LOG")"

moed_term "$MOED_PID" "$LOG"
MOED_PID=
exit 0
