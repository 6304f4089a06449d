#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moectl gen-model --router-skew: 0 writes the bytes the generator wrote
# before the option existed, a skew is deterministic for a seed and lives
# only in the router weights, it makes the routing of random inputs clearly
# uneven (the imbalance ratio of forward --stats) with other hot experts in
# each layer, and bad values are refused with one line.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

# imbalance FILE: the max/mean ratio that forward --stats printed in FILE.
imbalance() {
	sed -n 's/^imbalance: max\/mean \([0-9.]*\) .*/\1/p' "$1"
}

# at_least A B: A >= B, as decimal numbers.
at_least() {
	awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 >= b + 0) }'
}

# busiest FILE: the expert numbers of the busiest experts in forward --stats
# --top output FILE, on one line.
busiest() {
	sed -n 's/^  expert *\([0-9]*\) |.*/\1/p' "$1" | tr '\n' ' '
}

# stats STORE LAYER OUT: the expert load of 4096 random tokens at LAYER.
stats() {
	expect_ok "$MOECTL" forward --model "$1" --layer "$2" --random-input 4096 --seed 2 --stats \
		--top 8 --threads 1
	cp "$T/out" "$3"
	[ -n "$(imbalance "$3")" ] || { cat "$3" >&2; fail "no imbalance ratio in forward --stats output"; }
}

# ---- 0 is no skew: the bytes of before --------------------------------------------

gen_model "$T/plain" --arch qwen3_moe
gen_model "$T/zero" --arch qwen3_moe --router-skew 0
gen_model "$T/zero2" --arch qwen3_moe --router-skew=0.0
for f in config.json model.safetensors; do
	cmp -s "$T/plain/$f" "$T/zero/$f" || fail "--router-skew 0 changes $f"
	cmp -s "$T/plain/$f" "$T/zero2/$f" || fail "--router-skew=0.0 changes $f"
done
# What the generator wrote before --router-skew existed.  Only an intended
# change of the generated values may change these.
if command -v sha256sum >/dev/null 2>&1; then
	sum=$(sha256sum <"$T/zero/model.safetensors" | cut -d' ' -f1)
	[ "$sum" = 284244b722d3cd4f89b9df69faa6ece879b177abcc0cde0af34e7611575369ef ] ||
		fail "tiny qwen3_moe model.safetensors changed: sha256 $sum"
	gen_model "$T/ds" --arch deepseek_v3 --router-skew 0
	sum=$(sha256sum <"$T/ds/model.safetensors" | cut -d' ' -f1)
	[ "$sum" = db90e851bccf9e35160c8a9bdb63c705cea13b10534a8b278cfd7f6826266d0a ] ||
		fail "tiny deepseek_v3 model.safetensors changed: sha256 $sum"
fi

# ---- a skew: deterministic, in the router weights only --------------------------

gen_model "$T/s1" --arch qwen3_moe --router-skew 1.5 --seed 0
gen_model "$T/s1b" --arch qwen3_moe --seed 0 --router-skew 1.5
cmp -s "$T/s1/model.safetensors" "$T/s1b/model.safetensors" ||
	fail "--router-skew 1.5: two runs with the same seed differ"
cmp -s "$T/plain/config.json" "$T/s1/config.json" || fail "--router-skew changes config.json"
cmp -s "$T/plain/model.safetensors" "$T/s1/model.safetensors" &&
	fail "--router-skew 1.5 writes the same bytes as no skew"
[ "$(wc -c <"$T/plain/model.safetensors")" -eq "$(wc -c <"$T/s1/model.safetensors")" ] ||
	fail "--router-skew changes the size of model.safetensors"
# Every byte that differs lies in the data of a router (gate.weight).
st=$T/s1/model.safetensors
# shellcheck disable=SC2046  # the eight bytes, split on purpose
set -- $(od -An -tu1 -N8 "$st")
hlen=$(($1 + 256 * ($2 + 256 * ($3 + 256 * $4))))
head -c $((8 + hlen)) "$st" | tail -c "$hlen" | tr '}' '\n' |
	sed -n 's/.*"\([^"]*\.gate\.weight\)":{.*"data_offsets":\[\([0-9]*\),\([0-9]*\)\].*/\2 \3/p' \
	>"$T/routers"
[ "$(wc -l <"$T/routers")" -eq 2 ] || fail "expected 2 routers in the header, found: $(cat "$T/routers")"
cmp -l "$T/plain/model.safetensors" "$st" >"$T/diff"
awk -v base=$((8 + hlen)) 'NR == FNR { lo[NR] = $1; hi[NR] = $2; n = NR; next }
	{ o = $1 - 1 - base; ok = 0; for (i = 1; i <= n; i++) if (o >= lo[i] && o < hi[i]) ok = 1;
	  if (!ok) { print "byte " $1 " outside the routers"; exit 1 } }' "$T/routers" "$T/diff" >&2 ||
	fail "--router-skew changes more than the router weights"
expect_ok "$MOECTL" pack "$T/s1" -o "$T/s1.moe"
expect_ok "$MOECTL" verify "$T/s1.moe"
gen_model "$T/s1c" --arch qwen3_moe --router-skew 1.5 --seed 1
cmp -s "$T/s1/model.safetensors" "$T/s1c/model.safetensors" &&
	fail "--router-skew 1.5: seeds 0 and 1 give the same bytes"

# ---- the routing it makes ---------------------------------------------------------
# 128 experts, top-8, as Qwen3-30B-A3B routes; two layers.

shape="--arch qwen3_moe --experts 128 --top-k 8 --hidden 128 --moe-intermediate 16 --intermediate 32
	--layers 2 --vocab 64 --seed 5"
for s in 0 1 2; do
	# shellcheck disable=SC2086
	gen_model "$T/r$s" $shape --router-skew $s
	expect_ok "$MOECTL" pack "$T/r$s" -o "$T/r$s.moe"
	stats "$T/r$s.moe" 0 "$T/r$s-0.txt"
	stats "$T/r$s.moe" 1 "$T/r$s-1.txt"
done
i0=$(imbalance "$T/r0-0.txt")
i1=$(imbalance "$T/r1-0.txt")
i2=$(imbalance "$T/r2-0.txt")
# Measured: about 1.3, 5 and 7.4 (the most that symmetric random inputs
# allow is 128 / (2 * 8) = 8).
at_least 2 "$i0" || fail "imbalance $i0 without skew: expected a near uniform routing"
at_least "$i1" 3.5 || fail "imbalance $i1 at --router-skew 1: expected about 5"
at_least "$i1" "$(awk -v a="$i0" 'BEGIN { print 2 * a }')" ||
	fail "imbalance $i1 at --router-skew 1 is not clearly above $i0 without skew"
at_least "$i2" "$(awk -v a="$i1" 'BEGIN { print a + 1 }')" ||
	fail "imbalance $i2 at --router-skew 2 is not above $i1 at 1"
at_least 8 "$i2" || fail "imbalance $i2 at --router-skew 2 is above what a symmetric input allows"
i=$(imbalance "$T/r1-1.txt")
at_least "$i" 3.5 || fail "layer 1: imbalance $i at --router-skew 1"
h0=$(busiest "$T/r1-0.txt")
h1=$(busiest "$T/r1-1.txt")
if [ -z "$h0" ] || [ "$h0" = "$h1" ]; then
	fail "layers 0 and 1 have the same busiest experts: $h0"
fi
# A long tail, not a few experts taking everything: at S = 1 no expert idle.
grep -F "; 0 of 128 experts idle" "$T/r1-0.txt" >/dev/null ||
	{ cat "$T/r1-0.txt" >&2; fail "--router-skew 1 leaves experts idle"; }

# ---- bad values -------------------------------------------------------------------

for v in -1 -0.5 nan NaN inf 11 1e9 abc 1x ""; do
	expect_fail "$MOECTL" gen-model --arch qwen3_moe --router-skew "$v" -o "$T/bad"
	expect_msg "^moectl: --router-skew: expected a number from 0 to 10, got '$v'$"
	expect_one_line
done
expect_fail "$MOECTL" gen-model --arch qwen3_moe -o "$T/bad" --router-skew
expect_msg "^moectl: gen-model: --router-skew needs a value \(see moectl gen-model --help\)$"
[ ! -e "$T/bad" ] || fail "a refused gen-model created its output directory"

expect_ok "$MOECTL" gen-model --help
expect_out "--router-skew S"

exit 0
