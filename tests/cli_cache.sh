#!/bin/sh
# SPDX-License-Identifier: MIT
#
# The expert cache and the pager through moectl forward --model:
#  - every layer with a host budget of a tenth of the model succeeds and
#    gives the bytes of the run with no budget, under each policy, with and
#    without prefetching, and the peak resident memory stays within the
#    budget plus the stated fixed overhead (pager staging + 48 MiB);
#  - --trace-out writes a trace that moectl trace-sim reads;
#  - --inject-fault makes the forward that needs the expert fail with one
#    line naming layer and expert, and nothing else;
#  - bad cache options are refused with one line.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

M=$T/model
# 6 MoE layers x 32 experts of 1.5 MiB: a 290 MB store
gen_model "$M" --arch qwen3_moe --layers 6 --hidden 1024 --moe-intermediate 256 --experts 32 \
	--top-k 4 --vocab 64 --seed 5
expect_ok "$MOECTL" pack "$M" -o "$T/m.moe"
size_mb=$(( $(wc -c <"$T/m.moe") / 1048576 ))
budget=$(( size_mb / 10 ))

expect_ok "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 24 --output "$T/full.npy" \
	--stats
full_peak=$(sed -n 's/^peak resident memory: \([0-9]*\).*/\1/p' "$T/out")
[ -n "$full_peak" ] || fail "no peak resident memory in forward --stats"

for opts in "--policy lru" "--policy freq" "--policy auto --prefetch" "--policy lru --prefetch --queue-depth 4 --chunk-kb 256"; do
	# shellcheck disable=SC2086
	expect_ok "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 24 \
		--output "$T/small.npy" --stats --host-cache-mb "$budget" $opts
	cmp -s "$T/full.npy" "$T/small.npy" ||
		fail "a host budget of $budget MiB ($opts) changed the output bytes"
	grep -q "^host cache: budget $budget MiB" "$T/out" || fail "stats do not show the budget ($opts)"
	evicted=$(awk '$1 == "total" { print $7 }' "$T/out")
	[ "${evicted:-0}" -gt 0 ] || fail "nothing was evicted under a tenth of the model ($opts)"
	peak=$(sed -n 's/^peak resident memory: \([0-9]*\).*/\1/p' "$T/out")
	staging=$(sed -n 's/.*pager staging \([0-9]*\) MiB.*/\1/p' "$T/out")
	[ -n "$peak" ] && [ -n "$staging" ] || fail "no memory figures ($opts)"
	[ "$peak" -le $(( budget + staging + 48 )) ] || tsan_build ||
		fail "peak resident memory $peak MiB exceeds budget $budget + staging $staging + 48 MiB ($opts)"
	case $opts in
	*--prefetch*)
		grep -q 'recall' "$T/out" || fail "no prefetch precision and recall in the stats ($opts)"
		;;
	esac
done
[ "$full_peak" -gt $(( budget + 48 + 32 )) ] ||
	fail "the unbounded run's peak ($full_peak MiB) does not exceed the bound: the check proves nothing"

# ---- the figures as JSON --------------------------------------------------------------
expect_ok "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 8 --host-cache-mb "$budget" \
	--stats-json "$T/stats.json"
for key in '"host_cache"' '"pager"' '"total"' '"layers"' '"evictions"' '"stall_ns"' '"bytes_read"'; do
	grep -q "$key" "$T/stats.json" || fail "no $key in forward --stats-json"
done
[ "$(grep -c '"layer":' "$T/stats.json")" -eq 6 ] || fail "--stats-json should list 6 layers"

# ---- traces -------------------------------------------------------------------------
expect_ok "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 8 --repeat 3 \
	--trace-out "$T/trace.txt" --host-cache-mb "$budget" --stats
[ "$(grep -c -v '^#' "$T/trace.txt")" -eq $(( 6 * 3 + 1 )) ] ||
	fail "the trace should have a header and 18 batch lines"
expect_ok "$MOECTL" trace-sim "$T/trace.txt"
expect_out 'belady'
expect_ok "$MOECTL" trace-sim "$T/trace.txt" --slots 10 --json

# ---- faults -------------------------------------------------------------------------
# all experts of layer 2 run, so expert 7 is needed: it fails, once
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 2 --random-input 4 --all-experts --stats \
	--inject-fault io:2:7
expect_one_line
expect_msg 'layer 2 expert 7'
[ "$rc" -eq 5 ] || fail "moectl forward exit $rc for a failed read, not 5 (moectl(1))"
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 2 --random-input 4 --all-experts --stats \
	--host-cache-mb "$budget" --inject-fault checksum:2:7
expect_one_line
expect_msg 'layer 2 expert 7: checksum mismatch'
[ "$rc" -eq 5 ] || fail "moectl forward exit $rc for a checksum mismatch, not 5 (moectl(1))"
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 2 --random-input 4 --all-experts --stats \
	--inject-fault short:2:7
expect_one_line
expect_msg 'layer 2 expert 7: the store ends early'
# a fault on an expert no token needs changes nothing
expect_ok "$MOECTL" forward --model "$T/m.moe" --layer 2 --random-input 24 --output "$T/one.npy" \
	--routing-out "$T/r.npz"
expect_ok "$MOECTL" forward --model "$T/m.moe" --layer 3 --random-input 24 --output "$T/one.npy" \
	--inject-fault io:2:7

# ---- refusals -----------------------------------------------------------------------
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 4 --stats --host-cache-mb 1
expect_one_line
expect_msg 'too small.*at least'
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 1 --random-input 4 --stats --policy mru
expect_one_line
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 1 --random-input 4 --stats --pin 99:1
expect_one_line
expect_msg '99:1'
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 1 --random-input 4 --stats --pin 1:x
expect_one_line
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 1 --random-input 4 --stats --chunk-kb 6
expect_one_line
expect_fail "$MOECTL" forward --model "$T/m.moe" --layer 1 --random-input 4 --stats --inject-fault disk:1:1
expect_one_line

# pins are kept: every expert of layer 1 pinned, then a run over every layer
expect_ok "$MOECTL" forward --model "$T/m.moe" --layer all --random-input 24 --output "$T/pinned.npy" \
	--stats --host-cache-mb $(( budget * 3 )) --pin '1:*'
cmp -s "$T/full.npy" "$T/pinned.npy" || fail "pinning changed the output bytes"
grep -q ', 32 pinned' "$T/out" || fail "the stats do not show 32 pinned experts"
exit 0
