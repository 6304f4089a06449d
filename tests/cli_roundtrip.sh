#!/bin/sh
# SPDX-License-Identifier: MIT
#
# The model path end to end through the moectl binary: for each of the six
# architectures gen-model -> pack -> inspect (and --json) -> verify ->
# forward ([T,H] and [B,S,H], float32 and bfloat16, --routing-out), then
# the ways forward must refuse its input: wrong dtype, wrong hidden size,
# truncated .npy, layer out of range, a dense DeepSeek layer, a corrupted
# expert blob.  Every refusal must be a clean exit (not a crash) with one
# line that names the problem.
#
# Environment: MOECTL (the binary), top_builddir, top_srcdir (from make check).
# Exit 0 pass, 1 fail, 77 skip.

set -u

MOECTL=${MOECTL:-${top_builddir:-.}/client/moectl}
if [ ! -x "$MOECTL" ]; then
	echo "SKIP: no moectl at $MOECTL"
	exit 77
fi

T=$(mktemp -d "${TMPDIR:-/tmp}/moe-roundtrip-XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT
trap 'exit 1' HUP INT TERM

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

# ok CMD...: CMD must succeed; its output is left in $T/out.
ok() {
	"$@" >"$T/out" 2>&1
	st=$?
	if [ "$st" -ne 0 ]; then
		cat "$T/out" >&2
		fail "exit status $st from: $*"
	fi
}

# refuses TEXT CMD...: CMD must fail cleanly (status 1-127, so a crash fails
# the test) with one line "moectl: ..." on stderr containing TEXT.
refuses() {
	text=$1
	shift
	"$@" >"$T/out" 2>"$T/stderr"
	st=$?
	[ "$st" -ne 0 ] || fail "succeeded but should have failed: $*"
	[ "$st" -lt 128 ] || { cat "$T/stderr" >&2; fail "crashed (status $st): $*"; }
	grep -F -e "$text" "$T/stderr" >/dev/null || {
		cat "$T/stderr" >&2
		fail "the message of '$*' does not say '$text'"
	}
	[ "$(wc -l <"$T/stderr")" -eq 1 ] || { cat "$T/stderr" >&2; fail "more than one line from: $*"; }
	grep '^moectl: ' "$T/stderr" >/dev/null || fail "message not prefixed 'moectl: ': $*"
}

# ---- .npy by hand --------------------------------------------------------------

# npy_offset FILE: where the data of a version 1.0 .npy starts.
npy_offset() {
	set -- $(od -An -tu1 -j8 -N2 "$1")
	echo $((10 + $1 + 256 * $2))
}

# npy_header FILE: the header dict of an .npy, on one line.
npy_header() {
	head -c "$(npy_offset "$1")" "$1" | tail -c +11 | tr -d '\n'
}

# npy_shape FILE: the shape tuple, e.g. "(2, 3, 64)".
npy_shape() {
	npy_header "$1" | sed -n "s/.*'shape': *\(([0-9, ]*)\).*/\1/p"
}

# npy_with_header SRC DST DICT: DST = a v1.0 header with DICT + SRC's data.
npy_with_header() {
	dict=$3
	len=$((${#dict} + 11))
	pad=$(((64 - len % 64) % 64))
	hl=$((len + pad - 10))
	{
		printf '\223NUMPY\001\000'
		printf "\\$(printf %03o $((hl % 256)))\\$(printf %03o $((hl / 256)))"
		printf '%s' "$dict"
		i=0
		while [ "$i" -lt "$pad" ]; do printf ' '; i=$((i + 1)); done
		printf '\n'
		tail -c +"$(($(npy_offset "$1") + 1))" "$1"
	} >"$2"
}

# same_data A B: the two .npy files hold the same bytes after their headers.
same_data() {
	tail -c +"$(($(npy_offset "$1") + 1))" "$1" >"$T/a.bin"
	tail -c +"$(($(npy_offset "$2") + 1))" "$2" >"$T/b.bin"
	cmp -s "$T/a.bin" "$T/b.bin"
}

# ---- the store -----------------------------------------------------------------

# json_num FILE KEY: the first number after "KEY": in FILE.
json_num() {
	tr ',{}[]' '\n\n\n\n\n' <"$1" | sed -n "s/^[[:space:]]*\"$2\"[[:space:]]*:[[:space:]]*\([0-9][0-9]*\).*/\1/p" | head -n 1
}

# ---- every architecture ----------------------------------------------------------

for arch in mixtral qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3 glm4_moe gpt_oss; do
	d=$T/$arch
	mkdir "$d" || fail "mkdir $d"
	ok "$MOECTL" gen-model --arch "$arch" --seed 7 -o "$d/hf"
	ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
	ok "$MOECTL" inspect "$d/model.moe"
	grep -F "$arch" "$T/out" >/dev/null || fail "inspect does not name $arch"
	ok "$MOECTL" inspect --json "$d/model.moe"
	cp "$T/out" "$d/inspect.json"
	head -c 1 "$d/inspect.json" | grep '{' >/dev/null || fail "inspect --json is not a JSON object"
	grep -F "\"$arch\"" "$d/inspect.json" >/dev/null || fail "inspect --json does not name $arch"
	top_k=$(json_num "$d/inspect.json" top_k)
	[ -n "$top_k" ] || fail "$arch: no top_k in inspect --json"
	ok "$MOECTL" verify "$d/model.moe"

	# run the last MoE layer
	L=$(tr -d ' \n' <"$d/inspect.json" | sed -n 's/.*"moe_layers":\[\([0-9,]*\)\].*/\1/p')
	L=${L##*,}
	[ -n "$L" ] || fail "$arch: no moe_layers in inspect --json"

	ok "$MOECTL" forward --model "$d/model.moe" --layer "$L" --random-input 6 --seed 3 \
		--save-input "$d/in.npy" --output "$d/out.npy" --routing-out "$d/r.npz" --threads 2
	shape=$(npy_shape "$d/out.npy")
	H=$(echo "$shape" | sed -n 's/^(6, \([0-9]*\))$/\1/p')
	[ -n "$H" ] || fail "$arch: output shape $shape is not (6, H)"
	[ "$(npy_shape "$d/in.npy")" = "$shape" ] || fail "$arch: input and output shapes differ"

	# the routing: a zip holding ids.npy [6,k] int32 and weights.npy [6,k] float32
	[ "$(od -An -c -N4 "$d/r.npz" | tr -d ' ')" = 'PK003004' ] || fail "$arch: r.npz is not a zip"
	tr -c '[:print:]' '\n' <"$d/r.npz" >"$T/strings"
	grep -F "ids.npy" "$T/strings" >/dev/null || fail "$arch: no ids.npy in r.npz"
	grep -F "weights.npy" "$T/strings" >/dev/null || fail "$arch: no weights.npy in r.npz"
	grep -F "{'descr': '<i4', 'fortran_order': False, 'shape': (6, $top_k), }" "$T/strings" \
		>/dev/null || fail "$arch: ids in r.npz are not int32 [6,$top_k]"
	grep -F "{'descr': '<f4', 'fortran_order': False, 'shape': (6, $top_k), }" "$T/strings" \
		>/dev/null || fail "$arch: weights in r.npz are not float32 [6,$top_k]"
	if command -v unzip >/dev/null 2>&1; then
		unzip -tq "$d/r.npz" >/dev/null 2>&1 || fail "$arch: unzip -t rejects r.npz"
	fi

	# the same tokens from a file, and shaped [B,S,H]: the same bits
	ok "$MOECTL" forward --model "$d/model.moe" --layer "$L" --input "$d/in.npy" \
		--output "$d/out2.npy" --threads 1
	cmp -s "$d/out.npy" "$d/out2.npy" || fail "$arch: --input gives other bits than --random-input"
	npy_with_header "$d/in.npy" "$d/in3.npy" \
		"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, $H), }"
	ok "$MOECTL" forward --model "$d/model.moe" --layer "$L" --input "$d/in3.npy" \
		--output "$d/out3.npy"
	[ "$(npy_shape "$d/out3.npy")" = "(2, 3, $H)" ] || fail "$arch: [B,S,H] output has shape $(npy_shape "$d/out3.npy")"
	same_data "$d/out.npy" "$d/out3.npy" || fail "$arch: [B,S,H] output differs from [T,H]"

	# bfloat16 in, bfloat16 out
	ok "$MOECTL" forward --model "$d/model.moe" --layer "$L" --random-input 4 --dtype bf16 \
		--save-input "$d/in16.npy" --output "$d/out16.npy"
	npy_header "$d/out16.npy" | grep -F "'<u2'" >/dev/null || fail "$arch: bf16 output is not '<u2'"
	[ "$(npy_shape "$d/out16.npy")" = "(4, $H)" ] || fail "$arch: bf16 output shape"
	ok "$MOECTL" forward --model "$d/model.moe" --layer "$L" --input "$d/in16.npy" --dtype bf16 \
		--output "$d/out16b.npy"
	cmp -s "$d/out16.npy" "$d/out16b.npy" || fail "$arch: bf16 from a file differs"
done

# ---- a real preset, shrunk ---------------------------------------------------------
# GLM-4.5-Air's routing (128 experts, top-8, one shared expert, layer 0 dense)
# at a small width; its MTP layer (layer 2 here) is in the checkpoint and
# not in the store.

d=$T/glm-4.5-air
mkdir "$d" || fail "mkdir $d"
ok "$MOECTL" gen-model --preset glm-4.5-air --layers 2 --vocab 64 --hidden 64 \
	--moe-intermediate 16 --intermediate 64 --seed 5 -o "$d/hf"
grep -F '"model.layers.2.eh_proj.weight"' "$d/hf/model.safetensors" >/dev/null ||
	fail "glm-4.5-air: no MTP layer in the checkpoint"
ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
ok "$MOECTL" inspect --json "$d/model.moe"
for kv in num_experts:128 top_k:8 n_shared_experts:1 n_group:1 num_hidden_layers:2; do
	[ "$(json_num "$T/out" "${kv%%:*}")" = "${kv#*:}" ] ||
		fail "glm-4.5-air: inspect --json ${kv%%:*} is not ${kv#*:}"
done
[ "$(tr -d ' \n' <"$T/out" | sed -n 's/.*"moe_layers":\[\([0-9,]*\)\].*/\1/p')" = 1 ] ||
	fail "glm-4.5-air: the MoE layers are not just layer 1"
grep -F '"scoring": "sigmoid"' "$T/out" >/dev/null || fail "glm-4.5-air: not sigmoid scoring"
ok "$MOECTL" forward --model "$d/model.moe" --layer 1 --random-input 3 --seed 3 --output "$d/out.npy"
[ "$(npy_shape "$d/out.npy")" = "(3, 64)" ] || fail "glm-4.5-air: output shape $(npy_shape "$d/out.npy")"

# ---- FP8 as DeepSeek-V3 is released --------------------------------------------
# Codes and 128x128 block scales kept as they are (partial blocks at H 200,
# I 72), shown by inspect, served by the CPU (check_numerics holds them to
# the float64 reference).

d=$T/fp8
mkdir "$d" || fail "mkdir $d"
ok "$MOECTL" gen-model --arch deepseek_v3 --hidden 200 --moe-intermediate 72 --quant fp8 --seed 7 \
	-o "$d/hf"
grep -F '"quant_method": "fp8"' "$d/hf/config.json" >/dev/null || fail "fp8: no quantization_config"
ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
grep -F "(fp8_e4m3_b128)" "$T/out" >/dev/null || fail "fp8: pack does not say fp8_e4m3_b128"
ok "$MOECTL" inspect "$d/model.moe"
grep -E "^expert blob: .*fp8_e4m3_b128, 8\.[0-9]+ bits/weight" "$T/out" >/dev/null ||
	fail "fp8: inspect does not show the blob's format and bits per weight"
grep -E "^shared blob: .*fp8_e4m3_b128" "$T/out" >/dev/null || fail "fp8: inspect: shared blob"
ok "$MOECTL" inspect --json "$d/model.moe"
grep -F '"weight_dtype": "fp8_e4m3_b128"' "$T/out" >/dev/null || fail "fp8: inspect --json weight_dtype"
ok "$MOECTL" verify "$d/model.moe"
ok "$MOECTL" forward --model "$d/model.moe" --layer 2 --random-input 5 --seed 3 \
	--save-input "$d/in.npy" --output "$d/out.npy" --threads 2
[ "$(npy_shape "$d/out.npy")" = "(5, 200)" ] || fail "fp8: output shape $(npy_shape "$d/out.npy")"
ok "$MOECTL" forward --model "$d/model.moe" --layer 2 --input "$d/in.npy" --output "$d/out1.npy" \
	--threads 1
cmp -s "$d/out.npy" "$d/out1.npy" || fail "fp8: the thread count changed the output bits"
# --dtype bf16 dequantizes (for a backend without FP8 kernels)
ok "$MOECTL" pack "$d/hf" -o "$d/bf16.moe" --dtype bf16
ok "$MOECTL" inspect "$d/bf16.moe"
grep -E "^expert blob: .*; bf16, 16\.000 bits/weight" "$T/out" >/dev/null || fail "fp8 --dtype bf16: inspect"
ok "$MOECTL" forward --model "$d/bf16.moe" --layer 2 --input "$d/in.npy" --output "$d/outb.npy"
[ "$(npy_shape "$d/outb.npy")" = "(5, 200)" ] || fail "fp8 --dtype bf16: output shape"
# --quantize fp8 goes the other way: a bf16 checkpoint at ~8 bits/weight,
# served; the refusals name what to do instead
ok "$MOECTL" gen-model --arch deepseek_v3 --hidden 200 --moe-intermediate 72 --seed 7 -o "$d/hfb"
ok "$MOECTL" pack "$d/hfb" -o "$d/q.moe" --quantize fp8
grep -F "(fp8_e4m3_b128)" "$T/out" >/dev/null || fail "pack --quantize fp8 does not say fp8_e4m3_b128"
ok "$MOECTL" inspect "$d/q.moe"
grep -E "^expert blob: .*fp8_e4m3_b128, 8\.[0-9]+ bits/weight" "$T/out" >/dev/null ||
	fail "pack --quantize fp8: inspect does not show fp8_e4m3_b128 at ~8 bits/weight"
grep -E "^shared blob: .*fp8_e4m3_b128" "$T/out" >/dev/null || fail "pack --quantize fp8: shared blob"
ok "$MOECTL" verify "$d/q.moe"
ok "$MOECTL" forward --model "$d/q.moe" --layer 2 --input "$d/in.npy" --output "$d/outq.npy"
[ "$(npy_shape "$d/outq.npy")" = "(5, 200)" ] || fail "pack --quantize fp8: output shape"
refuses "--quantize and --dtype cannot be combined" \
	"$MOECTL" pack "$d/hfb" -o "$d/no.moe" --quantize fp8 --dtype bf16
refuses "'int4' is not supported (supported: fp8)" "$MOECTL" pack "$d/hfb" -o "$d/no.moe" --quantize int4
refuses "already quantized" "$MOECTL" pack "$d/hf" -o "$d/no.moe" --quantize fp8
# --quantize-skip, repeated: one list; the shared expert stays bf16
ok "$MOECTL" pack "$d/hfb" -o "$d/qs.moe" --quantize fp8 --quantize-skip lm_head \
	--quantize-skip mlp.shared_experts
grep -F "(fp8_e4m3_b128, shared bf16)" "$T/out" >/dev/null || fail "pack --quantize-skip: not fp8 + shared bf16"
ok "$MOECTL" inspect "$d/qs.moe"
grep -E "^shared blob: .*; bf16, 16\.000 bits/weight" "$T/out" >/dev/null || fail "pack --quantize-skip: shared blob"
ok "$MOECTL" forward --model "$d/qs.moe" --layer 2 --input "$d/in.npy" --output "$d/outqs.npy"
refuses "names no tensor of the checkpoint" \
	"$MOECTL" pack "$d/hfb" -o "$d/no.moe" --quantize fp8 --quantize-skip shared_exprts
refuses "it needs --quantize fp8" "$MOECTL" pack "$d/hfb" -o "$d/no.moe" --quantize-skip shared
# gen-model writes that layout itself, as a release that kept the shared expert
ok "$MOECTL" gen-model --arch deepseek_v3 --hidden 200 --moe-intermediate 72 --seed 7 --quant fp8 \
	--quant-skip shared -o "$d/hfs"
grep -F '"modules_to_not_convert"' "$d/hfs/config.json" >/dev/null || fail "--quant-skip: no modules_to_not_convert"
ok "$MOECTL" pack "$d/hfs" -o "$d/s.moe"
grep -F "(fp8_e4m3_b128, shared bf16)" "$T/out" >/dev/null || fail "pack of --quant-skip shared: dtypes"
refuses "neither shared nor routed" "$MOECTL" gen-model --arch deepseek_v3 --quant fp8 --quant-skip dense \
	-o "$d/no"
[ ! -e "$d/no.moe" ] || fail "a refused pack left a store"

# gpt-oss's MXFP4 release: kept in its bytes at 4.25 bits per weight,
# served on the CPU whatever the thread count, decoded by --dtype
d=$T/mxfp4
mkdir "$d" || fail "mkdir $d"
ok "$MOECTL" gen-model --arch gpt_oss --hidden 96 --moe-intermediate 64 --quant mxfp4 --seed 7 -o "$d/hf"
grep -F '"quant_method": "mxfp4"' "$d/hf/config.json" >/dev/null || fail "mxfp4: no quantization_config"
ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
grep -F "(mxfp4)" "$T/out" >/dev/null || fail "mxfp4: pack does not say mxfp4"
ok "$MOECTL" inspect "$d/model.moe"
grep -E "^expert blob: .*; mxfp4, 4\.250 bits/weight" "$T/out" >/dev/null ||
	fail "mxfp4: inspect does not show the format at 4.25 bits per weight"
ok "$MOECTL" verify "$d/model.moe"
ok "$MOECTL" forward --model "$d/model.moe" --layer 1 --random-input 5 --seed 3 \
	--save-input "$d/in.npy" --output "$d/out.npy" --threads 2
ok "$MOECTL" forward --model "$d/model.moe" --layer 1 --input "$d/in.npy" --output "$d/out1.npy" \
	--threads 1
cmp -s "$d/out.npy" "$d/out1.npy" || fail "mxfp4: the thread count changed the output bits"
ok "$MOECTL" pack "$d/hf" -o "$d/bf16.moe" --dtype bf16
ok "$MOECTL" inspect "$d/bf16.moe"
grep -E "^expert blob: .*; bf16, 16\.000 bits/weight" "$T/out" >/dev/null || fail "mxfp4 --dtype bf16: inspect"
refuses "already quantized (MXFP4)" "$MOECTL" pack "$d/hf" -o "$d/no.moe" --quantize fp8
[ ! -e "$d/no.moe" ] || fail "a refused pack left a store"

# int4 as GPTQ (act-order), AWQ and compressed-tensors release it: 4-bit
# codes kept, about 4.4 bits per weight with the scales, served, the same
# bits at any thread count; --dtype bf16 dequantizes
d=$T/int4
mkdir "$d" || fail "mkdir $d"
for q in gptq awq ct-int4; do
	extra=
	[ "$q" = gptq ] && extra=--desc-act
	ok "$MOECTL" gen-model --arch deepseek_v3 --hidden 256 --moe-intermediate 64 --quant $q \
		--group-size 64 $extra --seed 7 -o "$d/$q"
	ok "$MOECTL" pack "$d/$q" -o "$d/$q.moe"
	grep -F "(int4)" "$T/out" >/dev/null || fail "$q: pack does not say int4"
	ok "$MOECTL" inspect "$d/$q.moe"
	grep -E "^expert blob: .*; int4, 4\.[0-9]+ bits/weight" "$T/out" >/dev/null ||
		fail "$q: inspect does not show int4 at ~4.4 bits/weight"
	grep -E "^int4: +group 64, " "$T/out" >/dev/null || fail "$q: inspect does not show the group"
	grep -E "^source: .*\($q\)" "$T/out" >/dev/null || fail "$q: inspect does not show the source format"
	ok "$MOECTL" verify "$d/$q.moe"
	ok "$MOECTL" forward --model "$d/$q.moe" --layer 2 --random-input 5 --seed 3 \
		--save-input "$d/in.npy" --output "$d/out.npy" --threads 2
	[ "$(npy_shape "$d/out.npy")" = "(5, 256)" ] || fail "$q: output shape $(npy_shape "$d/out.npy")"
	ok "$MOECTL" forward --model "$d/$q.moe" --layer 2 --input "$d/in.npy" --output "$d/out1.npy" \
		--threads 1
	cmp -s "$d/out.npy" "$d/out1.npy" || fail "$q: the thread count changed the output bits"
done
grep -E "act-order permutation" "$T/out" >/dev/null && fail "ct-int4 has no permutation"
ok "$MOECTL" inspect --json "$d/gptq.moe"
grep -F '"act_order": true' "$T/out" >/dev/null || fail "gptq --desc-act: inspect --json act_order"
ok "$MOECTL" pack "$d/awq" -o "$d/bf16.moe" --dtype bf16
ok "$MOECTL" inspect "$d/bf16.moe"
grep -E "^expert blob: .*; bf16, 16\.000 bits/weight" "$T/out" >/dev/null || fail "awq --dtype bf16: inspect"
refuses "already quantized (awq)" "$MOECTL" pack "$d/awq" -o "$d/no.moe" --quantize fp8

# gpt-oss-120b's routing (128 experts, top-4, every layer MoE) at a small
# width, in transformers' bf16 layout; the store keeps the clamp and the
# expert biases.  The CUDA backend computes it (biases, clamp): it serves
# it, or fails for want of a device, never for the model.

d=$T/gpt-oss-120b
mkdir "$d" || fail "mkdir $d"
ok "$MOECTL" gen-model --preset gpt-oss-120b --layers 2 --vocab 64 --hidden 64 \
	--moe-intermediate 16 --seed 5 -o "$d/hf"
grep -F '"model.layers.1.mlp.experts.gate_up_proj_bias"' "$d/hf/model.safetensors" >/dev/null ||
	fail "gpt-oss-120b: no gate_up_proj_bias in the checkpoint"
ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
ok "$MOECTL" inspect --json "$d/model.moe"
for kv in num_experts:128 top_k:4 n_shared_experts:0 num_hidden_layers:2; do
	[ "$(json_num "$T/out" "${kv%%:*}")" = "${kv#*:}" ] ||
		fail "gpt-oss-120b: inspect --json ${kv%%:*} is not ${kv#*:}"
done
[ "$(tr -d ' \n' <"$T/out" | sed -n 's/.*"moe_layers":\[\([0-9,]*\)\].*/\1/p')" = 0,1 ] ||
	fail "gpt-oss-120b: the MoE layers are not 0 and 1"
grep -F '"act": "swiglu_oai"' "$T/out" >/dev/null || fail "gpt-oss-120b: not the clamped SwiGLU"
grep -F '"has_expert_bias": true' "$T/out" >/dev/null || fail "gpt-oss-120b: no expert biases"
grep -F '"swiglu_limit": 7.0' "$T/out" >/dev/null || fail "gpt-oss-120b: swiglu_limit is not 7"
ok "$MOECTL" forward --model "$d/model.moe" --layer 1 --random-input 3 --seed 3 --output "$d/out.npy"
[ "$(npy_shape "$d/out.npy")" = "(3, 64)" ] || fail "gpt-oss-120b: output shape $(npy_shape "$d/out.npy")"
if [ -f "$MOE_BACKEND_DIR/moe-backend-cuda.so" ]; then
	if "$MOECTL" forward --model "$d/model.moe" --layer 1 --random-input 3 --seed 3 --backend cuda \
		--output "$d/cuda.npy" >"$T/out" 2>"$T/stderr"; then
		[ "$(npy_shape "$d/cuda.npy")" = "(3, 64)" ] ||
			fail "gpt-oss-120b: CUDA output shape $(npy_shape "$d/cuda.npy")"
	else
		[ $? -lt 128 ] || fail "gpt-oss-120b: moectl crashed on the CUDA backend"
		if grep -F -e "no kernels for" -e "does not compute" "$T/stderr" >/dev/null; then
			cat "$T/stderr" >&2
			fail "gpt-oss-120b: the CUDA backend refused the model"
		fi
	fi
fi

# ---- what forward refuses --------------------------------------------------------
# A DeepSeek-V3 model whose layer 0 is dense.

d=$T/refusals
mkdir "$d" || fail "mkdir $d"
ok "$MOECTL" gen-model --arch deepseek_v3 --layers 3 --first-dense 1 --seed 9 -o "$d/hf"
ok "$MOECTL" pack "$d/hf" -o "$d/model.moe"
S=$d/model.moe
ok "$MOECTL" forward --model "$S" --layer 1 --random-input 4 --save-input "$d/in.npy" --output "$d/out.npy"
H=$(npy_shape "$d/in.npy" | sed -n 's/^(4, \([0-9]*\))$/\1/p')
[ -n "$H" ] || fail "no hidden size from $(npy_shape "$d/in.npy")"

# --help, --stats, --all-experts
ok "$MOECTL" forward --help
grep -F "usage: moectl forward" "$T/out" >/dev/null || fail "forward --help prints no usage"
ok "$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --repeat 3 --stats
for text in "tokens/s:" "runs 2-3" "expert load, layer 1" "imbalance: max/mean"; do
	grep -F "$text" "$T/out" >/dev/null || { cat "$T/out" >&2; fail "forward --stats does not print '$text'"; }
done
ok "$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --all-experts --output "$d/dense.npy"
[ "$(npy_shape "$d/dense.npy")" = "(4, $H)" ] || fail "--all-experts output shape"
cmp -s "$d/dense.npy" "$d/out.npy" && fail "--all-experts gives the same output as top-k routing"

refuses "cannot connect to moed at $d/no.sock: no such socket" \
	"$MOECTL" --socket "$d/no.sock" forward --layer 1 --input "$d/in.npy" --output "$d/o.npy"
refuses "is float32 but --dtype bf16" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --output "$d/o.npy" --dtype bf16
ok "$MOECTL" forward --model "$S" --layer 1 --random-input 4 --dtype bf16 --save-input "$d/in16.npy"
refuses "is bfloat16 but the activation dtype is float32" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/in16.npy" --output "$d/o.npy"
npy_with_header "$d/in.npy" "$d/f8.npy" "{'descr': '<f8', 'fortran_order': False, 'shape': (2, $H), }"
refuses "f8.npy: dtype '<f8' is not supported: use float32 ('<f4') or bfloat16 (--dtype bf16)" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/f8.npy" --output "$d/o.npy"
npy_with_header "$d/in.npy" "$d/half.npy" "{'descr': '<f4', 'fortran_order': False, 'shape': (8, $((H / 2))), }"
refuses "half.npy: hidden size $((H / 2)) does not match the model's $H" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/half.npy" --output "$d/o.npy"
head -c $(($(wc -c <"$d/in.npy") - 6)) "$d/in.npy" >"$d/trunc.npy"
refuses "trunc.npy: truncated" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/trunc.npy" --output "$d/o.npy"
refuses "layer 3 is out of range" \
	"$MOECTL" forward --model "$S" --layer 3 --input "$d/in.npy" --output "$d/o.npy"
refuses "layer 0 is a dense layer" \
	"$MOECTL" forward --model "$S" --layer 0 --input "$d/in.npy" --output "$d/o.npy"
[ ! -e "$d/o.npy" ] || fail "a refused forward left an output file"

# A corrupted expert: flip bytes inside the blob of the expert layer 1's first
# token is routed to, at the offset inspect --json gives.
ok "$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --routing-out "$d/r.npz"
ok "$MOECTL" inspect --json "$S"
cp "$T/out" "$d/inspect.json"
off=$(json_num "$d/inspect.json" experts_offset)
[ -n "$off" ] && [ "$off" -gt 0 ] || fail "no expert offset for layer 1"
# Expert 0 of the first MoE layer (layer 1); --all-experts makes sure it is read.
printf '\377\377\377\377\377\377\377\377' |
	dd of="$S" bs=1 seek=$((off + 100)) count=8 conv=notrunc 2>/dev/null || fail "dd"
refuses "layer 1 expert 0" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --output "$d/o.npy" --all-experts
refuses "checksum" \
	"$MOECTL" forward --model "$S" --layer 1 --input "$d/in.npy" --output "$d/o.npy" --all-experts
"$MOECTL" verify "$S" >"$T/out" 2>&1
st=$?
[ "$st" -ne 0 ] && [ "$st" -lt 128 ] || fail "verify of a corrupted store: status $st"

exit 0
