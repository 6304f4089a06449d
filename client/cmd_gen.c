/* SPDX-License-Identifier: MIT */
/*
 * moectl gen-model: write a random Hugging Face checkpoint.
 *
 * Options are read in two passes: the first finds --arch and --preset, which
 * set every default; the second applies the size options, so they override
 * the preset wherever they stand on the command line.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/genmodel.h"
#include "moectl.h"

enum gen_opt {
	O_ARCH, O_PRESET, O_LAYERS, O_HIDDEN, O_MOE_I, O_I, O_EXPERTS, O_TOPK, O_GROUPS, O_TOPK_GROUP,
	O_SHARED, O_SHARED_I, O_FIRST_DENSE, O_SPARSE_STEP, O_VOCAB, O_DTYPE, O_SEED, O_NORM,
	O_SCALING, O_ACT, O_PLAIN, O_FUSED, O_TOPK_METHOD, O_SHARD_MB, O_MTP, O_SKEW, O_OUTPUT, O_HELP,
	O_QUANT, O_QUANT_SKIP, O_GROUP_SIZE, O_DESC_ACT, O_SYM,
};

static const struct {
	const char *name;
	enum gen_opt id;
	bool arg;
} gen_opts[] = {
	{ "--arch", O_ARCH, true },
	{ "--preset", O_PRESET, true },
	{ "--layers", O_LAYERS, true },
	{ "--hidden", O_HIDDEN, true },
	{ "--moe-intermediate", O_MOE_I, true },
	{ "--intermediate", O_I, true },
	{ "--experts", O_EXPERTS, true },
	{ "--top-k", O_TOPK, true },
	{ "--groups", O_GROUPS, true },
	{ "--topk-group", O_TOPK_GROUP, true },
	{ "--shared-experts", O_SHARED, true },
	{ "--shared-intermediate", O_SHARED_I, true },
	{ "--first-dense", O_FIRST_DENSE, true },
	{ "--sparse-step", O_SPARSE_STEP, true },
	{ "--vocab", O_VOCAB, true },
	{ "--dtype", O_DTYPE, true },
	{ "--seed", O_SEED, true },
	{ "--norm-topk-prob", O_NORM, true },
	{ "--scaling", O_SCALING, true },
	{ "--act", O_ACT, true },
	{ "--plain-experts", O_PLAIN, false },
	{ "--fused", O_FUSED, false },
	{ "--topk-method", O_TOPK_METHOD, true },
	{ "--shard-mb", O_SHARD_MB, true },
	{ "--mtp-layers", O_MTP, true },
	{ "--router-skew", O_SKEW, true },
	{ "--quant", O_QUANT, true },
	{ "--quant-skip", O_QUANT_SKIP, true },
	{ "--group-size", O_GROUP_SIZE, true },
	{ "--desc-act", O_DESC_ACT, false },
	{ "--sym", O_SYM, false },
	{ "-o", O_OUTPUT, true },
	{ "--output", O_OUTPUT, true },
	{ "--help", O_HELP, false },
	{ "-h", O_HELP, false },
};

static void gen_usage(FILE *f)
{
	fputs("usage: moectl gen-model (--arch ARCH | --preset NAME) [options] -o DIR\n"
	      "\n"
	      "Write a random checkpoint in the Hugging Face layout of ARCH: config.json and\n"
	      "model.safetensors (or model-NNNNN-of-NNNNN.safetensors shards with\n"
	      "model.safetensors.index.json).  The same options and seed give the same bytes.\n"
	      "\n"
	      "  --arch ARCH             mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3,\n"
	      "                          glm4_moe, gpt_oss\n"
	      "  --preset NAME           tiny (default), small, deepseek-v3, kimi-k2,\n"
	      "                          deepseek-v2-lite, qwen3-30b-a3b, qwen2-57b-a14b,\n"
	      "                          mixtral-8x7b, olmoe-1b-7b, glm-4.5-air, glm-4.5, glm-4.6,\n"
	      "                          gpt-oss-20b, gpt-oss-120b;\n"
	      "                          the other options override it (real presets keep the real\n"
	      "                          layer count and vocabulary: lower them with --layers, --vocab)\n"
	      "  --layers N              num_hidden_layers\n"
	      "  --hidden N              hidden_size\n"
	      "  --moe-intermediate N    intermediate size of one routed expert\n"
	      "  --intermediate N        intermediate size of the dense MLP layers (qwen, deepseek, glm)\n"
	      "  --experts N             routed experts per MoE layer\n"
	      "  --top-k N               experts per token\n"
	      "  --groups N              deepseek, glm4_moe n_group\n"
	      "  --topk-group N          deepseek, glm4_moe topk_group\n"
	      "  --shared-experts N      deepseek, glm4_moe n_shared_experts; qwen2_moe: 0 removes the\n"
	      "                          shared expert\n"
	      "  --shared-intermediate N qwen2_moe shared_expert_intermediate_size\n"
	      "  --first-dense N         deepseek, glm4_moe first_k_dense_replace\n"
	      "  --sparse-step N         qwen decoder_sparse_step\n"
	      "  --vocab N               vocab_size\n"
	      "  --dtype bf16|f16|f32    weight dtype (default bf16)\n"
	      "  --seed N                random seed (default 0)\n"
	      "  --norm-topk-prob 0|1    renormalise the top-k weights (not mixtral)\n"
	      "  --scaling F             deepseek, glm4_moe routed_scaling_factor\n"
	      "  --act NAME              silu, gelu, gelu_pytorch_tanh, relu\n"
	      "  --plain-experts         experts without gate_proj: down(act(up x))\n"
	      "  --fused                 transformers v5 fused experts (gate_up_proj or, plain,\n"
	      "                          up_proj; down_proj)\n"
	      "  --topk-method M         deepseek_v2: greedy or group_limited_greedy\n"
	      "  --mtp-layers 0|1        deepseek_v3, glm4_moe multi-token-prediction layer (default 1)\n"
	      "  --router-skew S         route unevenly, as trained models do: in each layer the\n"
	      "                          expert of popularity rank r (random per layer) gets\n"
	      "                          ~ (r + E/16)^-S of the load; S from 0 (default, the\n"
	      "                          routing of before) to 10; 1: max/mean load about 5\n"
	      "                          with 128 experts, top-8\n"
	      "  --quant fp8             FP8 as DeepSeek-V3 is released: every MLP and expert\n"
	      "                          matrix F8_E4M3 with a float32 weight_scale_inv per\n"
	      "                          128x128 block (max |w| / 448), quantization_config\n"
	      "                          in config.json; the rest in --dtype\n"
	      "  --quant-skip shared|routed  with --quant fp8: leave the shared (or the routed)\n"
	      "                          experts in --dtype, named in quantization_config's\n"
	      "                          modules_to_not_convert as a release that kept them does\n"
	      "  --quant mxfp4           gpt_oss only: the experts in MXFP4 as gpt-oss is released\n"
	      "                          (*_blocks, *_scales U8, gate/up rows interleaved; per 32\n"
	      "                          values scale 2^(floor(log2 max|w|) - 2), nearest e2m1)\n"
	      "  --quant gptq|awq|ct-int4 int4 as GPTQ (checkpoint_format gptq), AutoAWQ (gemm)\n"
	      "                          or compressed-tensors (pack-quantized) write it: every\n"
	      "                          MLP and expert matrix rounded to nearest per group\n"
	      "                          (min/max asymmetric; ct-int4 symmetric max |w| / 7)\n"
	      "  --group-size N          int4 group size along the input (default 128; -1: one\n"
	      "                          group per row)\n"
	      "  --desc-act              gptq: act-order, columns dealt to groups shuffled (g_idx)\n"
	      "  --sym                   gptq: symmetric (zero point 8)\n"
	      "  --shard-mb N            shard above N MB (default 5000)\n"
	      "  -o, --output DIR        directory to write (created if missing)\n", f);
}

static int find_opt(const char *a, const char **ret_val, enum gen_opt *ret_id, bool *ret_arg)
{
	const char *eq = strncmp(a, "--", 2) == 0 ? strchr(a, '=') : NULL;
	size_t len = eq ? (size_t)(eq - a) : strlen(a);

	for (size_t i = 0; i < sizeof(gen_opts) / sizeof(gen_opts[0]); i++)
		if (strlen(gen_opts[i].name) == len && !strncmp(a, gen_opts[i].name, len)) {
			*ret_id = gen_opts[i].id;
			*ret_arg = gen_opts[i].arg;
			*ret_val = eq ? eq + 1 : NULL;
			return 0;
		}
	return -ENOENT;
}

/* An unknown option: the usage error, with the nearest of ours. */
static int gen_unknown(const char *arg)
{
	const char *names[sizeof(gen_opts) / sizeof(gen_opts[0])];
	size_t n = 0;

	for (size_t i = 0; i < sizeof(gen_opts) / sizeof(gen_opts[0]); i++)
		if (!strncmp(gen_opts[i].name, "--", 2))
			names[n++] = gen_opts[i].name + 2;
	return moectl_unknown("gen-model", "option", arg, names, n);
}

static int parse_u32(const char *opt, const char *s, uint32_t min, uint32_t max, uint32_t *ret)
{
	uint64_t v;

	if (moectl_parse_u64(opt, s, min, max, &v) < 0)
		return -EINVAL;
	*ret = (uint32_t)v;
	return 0;
}

/* Apply one option other than --arch/--preset/--help to @o. */
static int apply_opt(struct moe_gen_options *o, enum gen_opt id, const char *name, const char *v,
		     const char **ret_dir)
{
	uint64_t u;
	uint32_t x;

	switch (id) {
	case O_LAYERS: return parse_u32(name, v, 1, 1024, &o->num_layers);
	case O_HIDDEN: return parse_u32(name, v, 1, 1u << 17, &o->hidden_size);
	case O_MOE_I: return parse_u32(name, v, 1, 1u << 19, &o->moe_intermediate_size);
	case O_I: return parse_u32(name, v, 1, 1u << 20, &o->intermediate_size);
	case O_EXPERTS: return parse_u32(name, v, 1, 4096, &o->num_experts);
	case O_TOPK: return parse_u32(name, v, 1, 4096, &o->top_k);
	case O_GROUPS: return parse_u32(name, v, 1, 4096, &o->n_group);
	case O_TOPK_GROUP: return parse_u32(name, v, 1, 4096, &o->topk_group);
	case O_SHARED: return parse_u32(name, v, 0, 64, &o->n_shared_experts);
	case O_SHARED_I: return parse_u32(name, v, 1, 1u << 23, &o->shared_intermediate_size);
	case O_FIRST_DENSE: return parse_u32(name, v, 0, 1024, &o->first_k_dense_replace);
	case O_SPARSE_STEP: return parse_u32(name, v, 1, 1024, &o->decoder_sparse_step);
	case O_VOCAB: return parse_u32(name, v, 1, 1u << 22, &o->vocab_size);
	case O_MTP: return parse_u32(name, v, 0, 1, &o->num_nextn_predict_layers);
	case O_SEED:
		return moectl_parse_u64(name, v, 0, UINT64_MAX, &o->seed);
	case O_NORM:
		if (parse_u32(name, v, 0, 1, &x) < 0)
			return -EINVAL;
		o->norm_topk_prob = (int)x;
		return 0;
	case O_SHARD_MB:
		if (moectl_parse_u64(name, v, 1, UINT64_MAX / 1000000, &u) < 0)
			return -EINVAL;
		o->shard_bytes = u * 1000000;
		return 0;
	case O_DTYPE: {
		enum moe_dtype dt;

		if (moe_dtype_parse(v, &dt) < 0)
			return moectl_fail("%s: unknown dtype '%s' (bf16, f16, f32)", name, v), -EINVAL;
		o->dtype = dt;
		return 0;
	}
	case O_SCALING: {
		char *end;
		double f;

		errno = 0;
		f = strtod(v, &end);
		if (errno || end == v || *end || !isfinite(f) || f <= 0 || f > 1e6)
			return moectl_fail("%s: expected a positive number, got '%s'", name, v), -EINVAL;
		o->routed_scaling_factor = (float)f;
		return 0;
	}
	case O_QUANT:
		if (!strcmp(v, "fp8"))
			o->quant_fp8 = true;
		else if (!strcmp(v, "mxfp4"))
			o->quant_mxfp4 = true;
		else if (!strcmp(v, "gptq") || !strcmp(v, "awq") || !strcmp(v, "ct-int4"))
			o->quant_int4 = v;
		else
			return moectl_fail("%s: unknown quantization '%s' (fp8, mxfp4, gptq, awq, ct-int4)", name,
					   v), -EINVAL;
		return 0;
	case O_QUANT_SKIP:
		if (!strcmp(v, "shared"))
			o->quant_skip = MOE_GEN_QUANT_SKIP_SHARED;
		else if (!strcmp(v, "routed"))
			o->quant_skip = MOE_GEN_QUANT_SKIP_ROUTED;
		else
			return moectl_fail("%s: '%s' is neither shared nor routed", name, v), -EINVAL;
		return 0;
	case O_GROUP_SIZE: {
		char *end;
		long g;

		errno = 0;
		g = strtol(v, &end, 10);
		if (errno || end == v || *end || (g != -1 && (g <= 0 || g > (1 << 20) || g % 16)))
			return moectl_fail("%s: expected a multiple of 16 or -1, got '%s'", name, v), -EINVAL;
		o->q4_group_size = (int32_t)g;
		return 0;
	}
	case O_DESC_ACT:
		o->q4_desc_act = true;
		return 0;
	case O_SYM:
		o->q4_sym = true;
		return 0;
	case O_SKEW: {
		char *end;
		double f;

		errno = 0;
		f = strtod(v, &end);
		if (errno || end == v || *end || !isfinite(f) || f < 0 || f > MOE_GEN_MAX_ROUTER_SKEW)
			return moectl_fail("%s: expected a number from 0 to %g, got '%s'", name,
					   (double)MOE_GEN_MAX_ROUTER_SKEW, v), -EINVAL;
		o->router_skew = (float)f;
		return 0;
	}
	case O_ACT: {
		enum moe_act a;

		if (moe_act_parse(v, &a) < 0)
			return moectl_fail("%s: unknown activation '%s' (silu, gelu, gelu_pytorch_tanh, relu)",
					   name, v), -EINVAL;
		o->hidden_act = v;
		return 0;
	}
	case O_TOPK_METHOD:
		o->topk_method = v;
		return 0;
	case O_PLAIN:
		o->plain_experts = true;
		return 0;
	case O_FUSED:
		o->fused_experts = true;
		return 0;
	case O_OUTPUT:
		*ret_dir = v;
		return 0;
	default:
		return 0;
	}
}

int cmd_gen_model(int argc, char **argv)
{
	struct moe_gen_options o;
	struct moectl_progress prog;
	struct moe_err err = { 0 };
	const char *arch_s = NULL, *preset = NULL, *dir = NULL;
	enum moe_arch arch = MOE_ARCH_COUNT;
	double t0;
	int r;

	/* Pass 1: check the syntax, find --help, --arch and --preset. */
	for (int i = 1; i < argc; i++) {
		const char *val;
		enum gen_opt id;
		bool arg;

		if (find_opt(argv[i], &val, &id, &arg) < 0)
			return gen_unknown(argv[i]);
		if (!arg && val)
			return moectl_fail("gen-model: %.*s takes no value", (int)(strchr(argv[i], '=') - argv[i]),
					   argv[i]);
		if (arg && !val) {
			if (i + 1 >= argc)
				return moectl_usage("gen-model", "%s needs a value", argv[i]);
			val = argv[++i];
		}
		if (id == O_HELP) {
			gen_usage(stdout);
			return 0;
		} else if (id == O_ARCH) {
			arch_s = val;
		} else if (id == O_PRESET) {
			preset = val;
		}
	}
	if (arch_s && moe_arch_parse(arch_s, &arch) < 0)
		return moectl_fail("gen-model: unknown architecture '%s' (mixtral, qwen2_moe, qwen3_moe, "
				   "olmoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss)", arch_s);
	o.arch = arch;
	if (preset) {
		r = moe_gen_preset(preset, &o, &err);
		if (r < 0 && arch_s == NULL && (!strcmp(preset, "tiny") || !strcmp(preset, "small")))
			return moectl_fail("gen-model: preset '%s' needs --arch", preset);
		if (r < 0)
			return moectl_fail("gen-model: %s", err.msg);
		if (arch_s && o.arch != arch)
			return moectl_fail("gen-model: --arch %s conflicts with preset '%s', which is %s",
					   arch_s, preset, moe_arch_name(o.arch));
	} else if (arch_s) {
		moe_gen_defaults(arch, &o);
	} else {
		return moectl_usage("gen-model", "--arch or --preset is required");
	}

	/* Pass 2: every other option, in order. */
	for (int i = 1; i < argc; i++) {
		const char *val, *eq = strchr(argv[i], '=');
		char name[32];
		enum gen_opt id;
		bool arg;

		find_opt(argv[i], &val, &id, &arg);
		snprintf(name, sizeof(name), "%.*s", eq && val ? (int)(eq - argv[i]) : (int)strlen(argv[i]),
			 argv[i]);
		if (arg && !val)
			val = argv[++i];
		if (apply_opt(&o, id, name, val, &dir) < 0)
			return 1;
	}
	if (!dir)
		return moectl_usage("gen-model", "missing -o DIR");

	moectl_progress_init(&prog, "gen");
	t0 = moectl_now();
	r = moe_gen_model(&o, dir, moectl_progress, &prog, &err);
	moectl_progress_done(&prog);
	if (r < 0)
		return moectl_fail("gen-model: %s", err.msg[0] ? err.msg : strerror(-r));
	if (prog.tty)
		fprintf(stderr, "wrote %s (%s) in %.1f s\n", dir, moe_arch_name(o.arch), moectl_now() - t0);
	return 0;
}
