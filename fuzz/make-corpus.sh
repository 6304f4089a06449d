#!/bin/sh
# SPDX-License-Identifier: MIT
# Remake the seed corpora of the fuzz harnesses (fuzz/corpus/TARGET/) with
# the tools: the valid inputs are what moectl writes (gen-model, pack,
# forward), the edge cases are written here by hand.  The files are
# committed; run this after a format changes:
#
#   fuzz/make-corpus.sh BUILD_DIR [CORPUS_DIR]   (default: fuzz/corpus beside it)
#
# Regression inputs for bugs the fuzzers found are not made here: they are
# committed as found, named for the bug (see fuzz/README.md).
set -eu
bld=$1
here=$(cd "$(dirname "$0")" && pwd)
out=${2:-$here/corpus}
moectl=$bld/client/moectl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$out/store" "$out/safetensors" "$out/hfconfig" "$out/npy" "$out/trace" "$out/conf" \
	"$out/checkpoint"

# write_at FILE OFFSET: zero 8 bytes at OFFSET (the store harness fills a
# zero checksum or file_size in; see fuzz_store.c)
zero8() {
	printf '\0\0\0\0\0\0\0\0' | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

gen() {
	name=$1; shift
	"$moectl" gen-model "$@" --vocab 8 -o "$tmp/$name" >/dev/null
}

# --- checkpoints: config.json for hfconfig, one per family; the smallest
# --- few also give the safetensors seeds and, packed, the store seeds
gen qwen3 --arch qwen3_moe --layers 1 --hidden 16 --moe-intermediate 8 --experts 2 --top-k 1
gen dsv3 --arch deepseek_v3 --layers 2 --first-dense 1 --hidden 16 --moe-intermediate 8 \
	--intermediate 16 --experts 4 --top-k 2 --groups 2 --topk-group 1 --shared-experts 1 --mtp-layers 0
gen gptoss --arch gpt_oss --layers 1 --hidden 32 --moe-intermediate 32 --experts 2 --top-k 1
gen mixtral --arch mixtral --layers 1 --hidden 16 --moe-intermediate 8 --experts 2 --top-k 1
gen qwen2 --arch qwen2_moe --layers 1 --hidden 16 --moe-intermediate 8 --experts 2 --top-k 1 \
	--shared-intermediate 8
gen olmoe --arch olmoe --layers 1 --hidden 16 --moe-intermediate 8 --experts 2 --top-k 1
gen dsv2 --arch deepseek_v2 --layers 2 --first-dense 1 --hidden 16 --moe-intermediate 8 \
	--intermediate 16 --experts 4 --top-k 2 --groups 2 --topk-group 1 --topk-method group_limited_greedy
gen glm --arch glm4_moe --layers 2 --first-dense 1 --hidden 16 --moe-intermediate 8 \
	--intermediate 16 --experts 4 --top-k 2 --groups 2 --topk-group 1 --mtp-layers 0
gen fp8 --arch deepseek_v3 --layers 1 --first-dense 0 --hidden 16 --moe-intermediate 8 \
	--intermediate 16 --experts 4 --top-k 2 --groups 2 --topk-group 1 --mtp-layers 0 --quant fp8 --quant-skip shared
gen mxfp4 --arch gpt_oss --layers 1 --hidden 32 --moe-intermediate 32 --experts 2 --top-k 1 --quant mxfp4
gen gptq --arch qwen3_moe --layers 1 --hidden 32 --moe-intermediate 32 --experts 2 --top-k 1 \
	--quant gptq --group-size 32 --desc-act
gen awq --arch qwen3_moe --layers 1 --hidden 32 --moe-intermediate 32 --experts 2 --top-k 1 \
	--quant awq --group-size 32
gen ct --arch qwen3_moe --layers 1 --hidden 32 --moe-intermediate 32 --experts 2 --top-k 1 \
	--quant ct-int4 --group-size -1
for m in qwen3 dsv3 gptoss mixtral qwen2 olmoe dsv2 glm fp8 mxfp4 gptq awq ct; do
	cp "$tmp/$m/config.json" "$out/hfconfig/$m.json"
done
printf '{}' >"$out/hfconfig/empty-object.json"
printf '{"model_type": "qwen3_moe", "num_experts": 4294967295, "hidden_size": 1e400}' \
	>"$out/hfconfig/huge-values.json"

cp "$tmp/qwen3/model.safetensors" "$out/safetensors/qwen3.safetensors"
cp "$tmp/mxfp4/model.safetensors" "$out/safetensors/mxfp4.safetensors"
# the header alone, no tensors; a zero-length tensor; a header length past the end
printf '\002\0\0\0\0\0\0\0{}' >"$out/safetensors/no-tensors.safetensors"
h='{"__metadata__":{"format":"pt"},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
printf "\\$(printf %03o ${#h})\\0\\0\\0\\0\\0\\0\\0%s\\1\\2\\3\\4" "$h" >"$out/safetensors/empty-tensor.safetensors"
printf '\377\377\0\0\0\0\0\0{}' >"$out/safetensors/header-past-end.safetensors"

# --- whole checkpoints for the checkpoint harness: config.json, SEP,
# --- model.safetensors (fuzz_checkpoint.c); and one as an index with two
# --- shards, the second holding no tensor
sep='
@@moe-fuzz@@
'
for m in qwen3 mxfp4 fp8 gptq ct qwen2; do
	{ cat "$tmp/$m/config.json"; printf '%s' "$sep"; cat "$tmp/$m/model.safetensors"; } \
		>"$out/checkpoint/$m.ckpt"
done
st=$tmp/qwen3/model.safetensors
hlen=$(od -An -t u8 -N8 "$st" | tr -d ' ')
names=$(head -c $((8 + hlen)) "$st" | tail -c "$hlen" | grep -o '"[^"]*":{"dtype"' | sed 's/:{"dtype"//')
map=$(for n in $names; do printf '%s: "model-00001-of-00002.safetensors", ' "$n"; done)
{ cat "$tmp/qwen3/config.json"; printf '%s' "$sep"; cat "$st"; printf '%s' "$sep"
  printf '{"metadata": {"total_size": 0}, "weight_map": {%s}}' "${map%, }"; printf '%s' "$sep"
  printf '\002\0\0\0\0\0\0\0{}'; } >"$out/checkpoint/qwen3-sharded.ckpt"

for m in qwen3 dsv3 gptoss; do
	"$moectl" pack "$tmp/$m" -o "$tmp/$m.moe" >/dev/null
done
cp "$tmp/qwen3.moe" "$out/store/qwen3.moe"
# with file_size, header and table checksums zeroed: the harness fills them
# in, so mutations of the header reach the layout checks
for m in qwen3 dsv3 gptoss; do
	f=$out/store/$m-fill-sums.moe
	cp "$tmp/$m.moe" "$f"
	for off in 16 24 176 192; do zero8 "$f" $off; done
done
printf 'MOESTORE' >"$out/store/magic-only.moe"

# --- .npy: float32 and bfloat16 as forward reads and writes them, an int32
# --- array (version 2.0 header), a scalar
"$moectl" forward --model "$tmp/qwen3.moe" --layer 0 --random-input 2 --save-input "$out/npy/f32.npy" \
	--output "$tmp/o.npy" --trace-out "$tmp/qwen3.trace" >/dev/null
"$moectl" forward --model "$tmp/qwen3.moe" --layer 0 --random-input 1 --dtype bf16 \
	--save-input "$out/npy/bf16.npy" --output "$tmp/o.npy" >/dev/null
d="{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }"
printf '\223NUMPY\002\000\072\000\000\000%s\n\001\000\000\000\002\000\000\000' "$d" >"$out/npy/i32-v2.npy"
d="{'descr': '<f4', 'fortran_order': False, 'shape': (), }"
printf '\223NUMPY\001\000\070\000%s\n\000\000\200\077' "$d" >"$out/npy/scalar.npy"

# --- traces: forward's, over several layers and batches; edge cases
"$moectl" forward --model "$tmp/dsv3.moe" --layer 1 --random-input 4 --output "$tmp/o.npy" \
	--trace-out "$tmp/dsv3.trace" >/dev/null
cp "$tmp/qwen3.trace" "$out/trace/qwen3.trace"
cp "$tmp/dsv3.trace" "$out/trace/dsv3.trace"
printf 'moed-trace 1 3 4\n# a comment\n\n0 0 1 2 3\n2\t3\r\n1 2' >"$out/trace/comments-blank-no-eol.trace"

# --- moed.conf: the shipped example, every setting set, edge cases
cp "$here/../etc/moed.conf" "$out/conf/moed.conf"
cat >"$out/conf/every-setting.conf" <<'CONF'
model = "/var/lib/moed/model.moe";
backend = "cpu";
threads = 2;
socket = { path = "/run/moed/moed.sock"; mode = "0660"; group = ""; };
access = { uids = [ 0 ]; gids = [ "root" ]; };
cache = { gpu_mb = 0; host_mb = 4096L; pin = [ "3:*", "4:7" ]; pin_hot = 2; policy = "lru"; };
pager = { queue_depth = 8; chunk_kb = 512; prefetch = false; };
batch = { window_us = 0x10; max_tokens = 4096; };
limits = { max_clients = 8; max_tokens_per_request = 1024; segment_mb = 64; };
log = { level = "debug"; };
CONF
printf 'cache: { host_mb = 99999999999999999999; };\n' >"$out/conf/integer-overflow.conf"
printf '' >"$out/conf/empty.conf"
