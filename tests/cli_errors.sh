#!/bin/sh
# SPDX-License-Identifier: MIT
# Every bad input to moectl pack / inspect / verify gives a non-zero exit and
# one clear line naming the culprit on stderr; never a crash.
. "${top_srcdir:-.}/tests/lib.sh"

export LC_ALL=C

# One checkpoint, copied for each kind of damage.
gen_model "$T/good" --arch qwen3_moe --seed 1
copy() { rm -rf "$T/$1"; cp -R "$T/good" "$T/$1"; }

# fails with one line matching PATTERN
bad() {
	pattern=$1
	shift
	expect_fail "$@"
	expect_one_line
	expect_msg "^moectl: "
	expect_msg "$pattern"
}

# --- usage --------------------------------------------------------------------
bad "pack: missing -o STORE" "$MOECTL" pack "$T/good"
bad "pack: missing HF_DIR" "$MOECTL" pack -o "$T/x.moe"
bad "pack: --dtype: 'int8' is not one of" "$MOECTL" pack "$T/good" -o "$T/x.moe" --dtype int8
bad "pack: unknown option.*--frobnicate" "$MOECTL" pack --frobnicate "$T/good" -o "$T/x.moe"
bad "inspect: missing STORE" "$MOECTL" inspect
bad "verify: unknown option '--json'" "$MOECTL" verify --json "$T/x.moe"
expect_ok "$MOECTL" pack --help
expect_out "usage: moectl pack"
expect_ok "$MOECTL" inspect --help
expect_ok "$MOECTL" verify --help

# --- checkpoints ----------------------------------------------------------------
bad "$T/nowhere: No such file or directory" "$MOECTL" pack "$T/nowhere" -o "$T/x.moe"

copy noconf
rm "$T/noconf/config.json"
bad "noconf/config.json: No such file or directory" "$MOECTL" pack "$T/noconf" -o "$T/x.moe"

copy badjson
printf '{"model_type": "qwen3_moe",\n "hidden_size": 64,,\n}\n' >"$T/badjson/config.json"
bad "badjson/config.json: bad JSON at line 2, column" "$MOECTL" pack "$T/badjson" -o "$T/x.moe"

copy llama
sed -i 's/"model_type": *"qwen3_moe"/"model_type": "llama"/' "$T/llama/config.json"
bad "config.json: model_type 'llama' is not supported \(supported: mixtral, qwen2_moe" \
	"$MOECTL" pack "$T/llama" -o "$T/x.moe"

copy nofield
sed -i '/"num_experts":/d' "$T/nofield/config.json"
bad "config.json: missing field 'num_experts'" "$MOECTL" pack "$T/nofield" -o "$T/x.moe"

copy badtype
sed -i 's/"num_experts_per_tok": *\([0-9]*\)/"num_experts_per_tok": "\1"/' "$T/badtype/config.json"
bad "field 'num_experts_per_tok' must be an integer, not a string" \
	"$MOECTL" pack "$T/badtype" -o "$T/x.moe"

# a tensor renamed in the header (same length): the expected one is missing
copy notensor
sed -i 's/model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight/model.layers.1.mlp.experts.3.up_proj.weighX/' \
	"$T/notensor/model.safetensors"
bad "tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' not found in .*notensor/model\.safetensors" \
	"$MOECTL" pack "$T/notensor" -o "$T/x.moe"

# config.json disagrees with the tensors
copy shape
sed -i 's/"hidden_size": *64/"hidden_size": 32/' "$T/shape/config.json"
bad "tensor 'model\.layers\.0\.mlp\.gate\.weight' in .*has shape \[8, 64\], expected \[8, 32\]" \
	"$MOECTL" pack "$T/shape" -o "$T/x.moe"

# "BF16" -> "I16 ": the same header length and element size, a dtype moed
# does not serve
copy dtype
sed -i 's/"dtype":"BF16"/"dtype":"I16" /g' "$T/dtype/model.safetensors"
bad "tensor 'model\.layers\.0\.mlp\.gate\.weight' in .* has dtype I16; moed reads F32, BF16 and F16" \
	"$MOECTL" pack "$T/dtype" -o "$T/x.moe"

copy trunc
size=$(wc -c <"$T/trunc/model.safetensors")
dd if="$T/good/model.safetensors" of="$T/trunc/model.safetensors" bs=1000 count=$((size / 1000 - 1)) \
	2>/dev/null || fail "dd"
bad "trunc/model\.safetensors.*(truncat|short|outside|end of)" "$MOECTL" pack "$T/trunc" -o "$T/x.moe"

# a sharded checkpoint missing a shard
gen_model "$T/sharded" --arch mixtral --hidden 256 --moe-intermediate 128 --shard-mb 1 --seed 2
[ -f "$T/sharded/model.safetensors.index.json" ] || fail "gen-model did not shard"
rm "$T/sharded/model-00002-of-"*.safetensors
bad "model-00002-of-.*safetensors" "$MOECTL" pack "$T/sharded" -o "$T/x.moe"

# FP8 checkpoints (DeepSeek-V3's release format): a quant_method moed does
# not serve, a scale tensor missing (renamed in the header, same length)
gen_model "$T/fp8" --arch deepseek_v3 --quant fp8 --seed 1
rm -rf "$T/bnb" && cp -R "$T/fp8" "$T/bnb"
sed -i 's/"quant_method": *"fp8"/"quant_method": "bitsandbytes"/' "$T/bnb/config.json"
bad "config.json: quantization_config.quant_method 'bitsandbytes' is not supported \(supported: fp8 with weight_block_size \[128, 128\]; mxfp4; gptq, awq \(gemm\) and compressed-tensors \(pack-quantized\) with 4 bits\)" \
	"$MOECTL" pack "$T/bnb" -o "$T/x.moe"
# int4: a GPTQ checkpoint with its scales missing (renamed in the header),
# gen-model's group size not dividing a matrix, int4 options without int4
gen_model "$T/gptq" --arch qwen3_moe --hidden 256 --moe-intermediate 128 --quant gptq --group-size 64 --seed 1
sed -i 's/model\.layers\.0\.mlp\.experts\.2\.down_proj\.scales/model.layers.0.mlp.experts.2.down_proj.scaleX/' \
	"$T/gptq/model.safetensors"
bad "int4 matrix 'model\.layers\.0\.mlp\.experts\.2\.down_proj' \(256 x 128\) in .*gptq/model\.safetensors has no scales: tensor 'model\.layers\.0\.mlp\.experts\.2\.down_proj\.scales' is missing" \
	"$MOECTL" pack "$T/gptq" -o "$T/x.moe"
bad "gen-model: --quant awq: an expert's down is 256 x 80; int4 needs rows a multiple of 8 and columns of 16 and of the group size 32" \
	"$MOECTL" gen-model --arch qwen3_moe --hidden 256 --moe-intermediate 80 --quant awq --group-size 32 -o "$T/x"
bad "gen-model: --group-size, --desc-act and --sym need --quant gptq, awq or ct-int4" \
	"$MOECTL" gen-model --arch qwen3_moe --desc-act -o "$T/x"
bad "gen-model: --desc-act and --sym are GPTQ's \(--quant gptq\), not awq" \
	"$MOECTL" gen-model --arch qwen3_moe --quant awq --desc-act -o "$T/x"
rm -rf "$T/noscale" && cp -R "$T/fp8" "$T/noscale"
sed -i 's/model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight_scale_inv/model.layers.1.mlp.experts.3.up_proj.weight_scale_inX/' \
	"$T/noscale/model.safetensors"
bad "tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' in .*noscale/model\.safetensors is F8_E4M3 but its scales 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight_scale_inv' are missing" \
	"$MOECTL" pack "$T/noscale" -o "$T/x.moe"

# gpt_oss in FP8 is not a released format (gpt-oss ships MXFP4) and has no
# blob layout (biases after block scales): refused by gen-model and pack
bad "gen-model: --quant fp8: expert biases \(gpt_oss\) with fp8 weights are not supported yet" \
	"$MOECTL" gen-model --arch gpt_oss --quant fp8 -o "$T/ossfp8"
gen_model "$T/oss" --arch gpt_oss --hidden 64 --moe-intermediate 16 --layers 2 --seed 1
sed -i 's/^{/{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},/' \
	"$T/oss/config.json"
bad "oss/config\.json: expert biases \(gpt_oss\) with fp8 weights are not supported yet" \
	"$MOECTL" pack "$T/oss" -o "$T/x.moe"

# nothing is left behind by a failed pack
[ ! -e "$T/x.moe" ] || fail "a failed pack left $T/x.moe"
ls -A "$T" | grep -q '^\.x\.moe\.' && fail "a failed pack left its temporary: $(ls -A "$T" | grep '^\.x\.moe\.')"

# an output directory that does not exist
bad "$T/no/such/dir/x\.moe: cannot open its directory $T/no/such/dir: No such file or directory" \
	"$MOECTL" pack "$T/good" -o "$T/no/such/dir/x.moe"

# --- stores ---------------------------------------------------------------------------
expect_ok "$MOECTL" pack "$T/good" -o "$T/good.moe"
expect_out "^packed 2 MoE layers x 8 experts \(bf16\) into .*good\.moe"
[ ! -s "$T/err" ] || fail "pack wrote to stderr when not on a terminal"
expect_ok "$MOECTL" verify "$T/good.moe"
expect_out "^OK: 18 blobs verified$"
expect_ok "$MOECTL" inspect "$T/good.moe"
expect_out "^model_type: +qwen3_moe$"
expect_ok "$MOECTL" inspect --json "$T/good.moe"
expect_out '"num_experts": 8'

bad "$T/missing\.moe: No such file or directory" "$MOECTL" inspect "$T/missing.moe"
bad "config\.json: not a \.moe store \(bad magic\)" "$MOECTL" inspect "$T/good/config.json"
bad "not a \.moe store" "$MOECTL" verify "$T/good/config.json"

size=$(wc -c <"$T/good.moe")
cp "$T/good.moe" "$T/trunc.moe"
dd if="$T/good.moe" of="$T/trunc.moe" bs=4096 count=$((size / 4096 - 1)) 2>/dev/null || fail "dd"
bad "trunc\.moe: truncated store: $((size - 4096)) bytes on disk, the header says $size" \
	"$MOECTL" verify "$T/trunc.moe"
bad "truncated store" "$MOECTL" inspect "$T/trunc.moe"

# a damaged header
cp "$T/good.moe" "$T/hdr.moe"
printf 'XX' | dd of="$T/hdr.moe" bs=1 seek=200 conv=notrunc 2>/dev/null
bad "hdr\.moe: header checksum mismatch" "$MOECTL" inspect "$T/hdr.moe"

# a damaged expert: the last expert of the last layer ends at the file's end
cp "$T/good.moe" "$T/blob.moe"
printf 'CORRUPT!' | dd of="$T/blob.moe" bs=1 seek=$((size - 100)) conv=notrunc 2>/dev/null
expect_ok "$MOECTL" inspect "$T/blob.moe"
bad "blob\.moe: layer 1 expert 7: checksum mismatch \(stored [0-9a-f]{16}, computed [0-9a-f]{16}\)" \
	"$MOECTL" verify "$T/blob.moe"
[ "$rc" -eq 5 ] || fail "verify exit status $rc, expected 5 (a checksum mismatch)"
[ ! -s "$T/out" ] || fail "verify printed OK for a damaged store"

exit 0
