/* SPDX-License-Identifier: MIT */
/*
 * The CUDA backend against the CPU backend (the reference backend) and the
 * float64 reference of ref.c, through the engine.
 *
 * Without a usable device (no driver, no GPU, or a module without compute
 * kernels) "auto" must fall back to the CPU backend and say why, "cuda"
 * must fail with that reason, and the test exits 77 (skip).
 *
 * With one, "auto" must pick the CUDA backend, and for every architecture
 * (mixtral; qwen2_moe with its sigmoid-gated shared expert; qwen3_moe;
 * olmoe; deepseek_v2 greedy with scaling and group_limited_greedy;
 * deepseek_v3 with correction bias, groups, scaling and shared experts, up
 * to 256 experts, and with dropped groups masked; glm4_moe with GLM-4.5-Air's
 * routing, top-1 normalised, groups; gpt_oss with its router bias, expert
 * biases and clamped SwiGLU, inputs past the clamp), bfloat16, float32,
 * float16 and FP8 block-scaled weights (DeepSeek-V3's 128 x 128 blocks,
 * partial blocks, shared experts in FP8, and a release that quantized only
 * the routed experts or only the shared ones), gpt-oss's MXFP4 experts,
 * int4 experts as GPTQ (act-order groups; symmetric, one group a row), AWQ
 * and compressed-tensors write them, SwiGLU, GELU-gated and plain ReLU
 * experts, hidden sizes that are not multiples of 16, and batches of 1024,
 * 300, 64, 8, 3 and 1 tokens (each the first tokens of the same 1024).  A
 * case with cuda_refuses is a model the CUDA backend must refuse at open,
 * saying it has no kernels for its dtype, while the logic below runs it
 * with MOE_GPU_TEST_BACKEND=cpu:
 *   - per token, the CUDA output is within a relative L2 error of 1e-3 of
 *     the CPU backend's, with the same experts in the same slots and
 *     weights within 1e-5 relative; a token whose selection is within 1e-6
 *     of a tie (float64 router scores from the checkpoint) may differ;
 *   - per token, the numerical contract of ARCHITECTURE.md 4.1 against the
 *     float64 reference: relative L2 <= 1e-4, the reference's experts and
 *     weights, except tokens within 1e-6 of a tie;
 *   - run to run: the same batch twice gives the same bits (output,
 *     experts, weights);
 *   - batch invariance (backend.h: a token's output bits do not depend on
 *     the other tokens) where the CUDA backend has it, batches of fewer
 *     than INVARIANT_BELOW tokens (from there an expert may have enough
 *     tokens for cuBLAS, whose bits depend on the product's size; moed(8)):
 *     a token's bits in such a batch are its bits in the largest of them;
 *   - MOE_FWD_ALL_EXPERTS (every expert, weight 1/E, plus the shared ones)
 *     against the CPU backend and the float64 dense reference;
 *   - paging: a CUDA engine with a host budget of a few expert slots, which
 *     must evict and read experts from the store again (with prefetching),
 *     gives the bits of a fully resident CUDA engine on the same sequence
 *     of layers and batches.
 *
 * MOE_GPU_TEST_QUICK=1 runs fewer models and batch sizes (for
 * tests/gpu_sanitize.sh, under compute-sanitizer).  MOE_GPU_TEST_BACKEND=cpu
 * runs every check with the CPU backend in the CUDA backend's place: a check
 * of this test itself on a machine without a device.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/err.h"
#include "formats/genmodel.h"
#include "engine/model.h"
#include "formats/pack.h"
#include "ref.h"
#include "formats/safetensors.h"
#include "testutil.h"

#define TIE_MARGIN 1e-6     /* ARCHITECTURE.md 4.1: selections this close to a tie are exempt */
#define DEV_RTOL 1e-3       /* CUDA against the CPU backend, relative L2 per token */
#define REF_RTOL 1e-4       /* against the float64 reference (float32 activations) */
#define WEIGHT_RTOL 1e-5    /* combine weights, relative */
#define MAX_TOKENS 1024u    /* the largest batch; every batch is a prefix of it */
#define DENSE_TOKENS 37u    /* batch of the MOE_FWD_ALL_EXPERTS comparison */
#define MAX_REPORTED 5      /* failures printed per model before its summary */
#define LAYER 1u            /* the MoE layer every model has (deepseek's layer 0 is dense) */
#define CPU_THREADS 4u      /* the CPU backend's threads: its bits do not depend on them */

/* Largest first: the first run is the one the others must match bit for bit. */
static const uint32_t batches_full[] = { 1024, 300, 64, 8, 3, 1 };
static const uint32_t batches_quick[] = { 64, 3, 1 };

struct gcase {
	const char *what;            /* what is special about it, for messages */
	enum moe_arch arch;
	enum moe_dtype dtype;
	uint32_t H, I, E, k;
	uint32_t n_group, topk_group;
	uint32_t n_shared;           /* deepseek: count; qwen2_moe: 1 = shared expert */
	uint32_t shared_I;           /* qwen2_moe shared_expert_intermediate_size */
	int norm;                    /* norm_topk_prob: -1 the architecture's default */
	float rsf;                   /* routed_scaling_factor; 0: the default */
	const char *topk_method;     /* deepseek_v2 */
	const char *act;             /* NULL: silu */
	bool plain;                  /* down(act(up x)), no gate projection */
	bool quick;                  /* also with MOE_GPU_TEST_QUICK */
	/* Called on the checkpoint directory before packing, to plant values
	 * random weights would not produce; may be NULL. */
	void (*patch)(const char *dir, uint32_t layer, char *why, size_t why_len);
	uint32_t ids_below;          /* nonzero: every chosen expert must be below this */
	float x_scale;               /* inputs uniform in [-x_scale, x_scale); 0: 1 */
	bool cuda_refuses;           /* the CUDA backend refuses the model at open */
	/* FP8 only: the shared expert's (MIX_SHARED_BF16) or the routed experts'
	 * (MIX_ROUTED_BF16) matrices taken from a bf16 twin of the checkpoint,
	 * as a release that quantized one kind of expert only */
	enum { MIX_NONE, MIX_SHARED_BF16, MIX_ROUTED_BF16 } mix;
	/* INT4 only: gen-model's --quant (gptq, awq, ct-int4), group size (-1:
	 * one group a row), act-order, symmetric */
	const char *int4;
	int32_t q4_group;
	bool q4_desc_act, q4_sym;
};

static void plant_negative_bias(const char *dir, uint32_t layer, char *why, size_t why_len);

static const struct gcase cases[] = {
	{ "SwiGLU", MOE_ARCH_MIXTRAL, MOE_DTYPE_BF16, .H = 128, .I = 64, .E = 8, .k = 2,
	  .norm = -1, .quick = true },
	{ "H not a multiple of 16", MOE_ARCH_MIXTRAL, MOE_DTYPE_F32, .H = 72, .I = 44, .E = 8, .k = 2,
	  .norm = -1 },
	{ "shared expert with sigmoid gate", MOE_ARCH_QWEN2_MOE, MOE_DTYPE_BF16, .H = 128, .I = 32,
	  .E = 16, .k = 4, .n_shared = 1, .shared_I = 96, .norm = 0, .quick = true },
	{ "normalised, H = 200", MOE_ARCH_QWEN3_MOE, MOE_DTYPE_BF16, .H = 200, .I = 64, .E = 32,
	  .k = 8, .norm = 1, .quick = true },
	{ "GELU (tanh) experts", MOE_ARCH_QWEN3_MOE, MOE_DTYPE_F16, .H = 64, .I = 48, .E = 16, .k = 4,
	  .norm = 1, .act = "gelu_pytorch_tanh" },
	{ "64 experts, unnormalised", MOE_ARCH_OLMOE, MOE_DTYPE_BF16, .H = 64, .I = 32, .E = 64,
	  .k = 8, .norm = 0, .quick = true },
	{ "plain ReLU experts", MOE_ARCH_OLMOE, MOE_DTYPE_F32, .H = 96, .I = 44, .E = 16, .k = 2,
	  .norm = 0, .act = "relu", .plain = true },
	{ "greedy, scaled, two shared", MOE_ARCH_DEEPSEEK_V2, MOE_DTYPE_BF16, .H = 96, .I = 48,
	  .E = 16, .k = 6, .n_shared = 2, .norm = 0, .rsf = 16.0f, .topk_method = "greedy" },
	{ "group_limited_greedy, normalised", MOE_ARCH_DEEPSEEK_V2, MOE_DTYPE_BF16, .H = 128,
	  .I = 32, .E = 32, .k = 6, .n_group = 8, .topk_group = 3, .n_shared = 1, .norm = 1,
	  .rsf = 16.0f, .topk_method = "group_limited_greedy", .quick = true },
	{ "group_limited_greedy, scaled", MOE_ARCH_DEEPSEEK_V2, MOE_DTYPE_F32, .H = 72, .I = 36,
	  .E = 16, .k = 3, .n_group = 4, .topk_group = 2, .n_shared = 2, .norm = 0, .rsf = 2.0f,
	  .topk_method = "group_limited_greedy" },
	{ "8 groups, bias, scaled", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, .H = 200, .I = 64, .E = 64,
	  .k = 8, .n_group = 8, .topk_group = 4, .n_shared = 1, .norm = 1, .rsf = 2.5f,
	  .quick = true },
	{ "256 experts, two shared", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_F32, .H = 56, .I = 16,
	  .E = 256, .k = 8, .n_group = 8, .topk_group = 4, .n_shared = 2, .norm = 1, .rsf = 2.5f },
	{ "dropped groups masked with -inf", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_BF16, .H = 64, .I = 32,
	  .E = 16, .k = 4, .n_group = 4, .topk_group = 2, .n_shared = 1, .norm = 1, .rsf = 2.5f,
	  .patch = plant_negative_bias, .ids_below = 8, .quick = true },
	{ "GLM-4.5-Air routing, 128 experts", MOE_ARCH_GLM4_MOE, MOE_DTYPE_BF16, .H = 128, .I = 32,
	  .E = 128, .k = 8, .n_shared = 1, .norm = -1, .quick = true },
	{ "top-1, normalised, scaled", MOE_ARCH_GLM4_MOE, MOE_DTYPE_F32, .H = 72, .I = 40, .E = 16,
	  .k = 1, .n_shared = 1, .norm = 1, .rsf = 1.8f },
	{ "groups, unnormalised, two shared", MOE_ARCH_GLM4_MOE, MOE_DTYPE_F16, .H = 96, .I = 32,
	  .E = 32, .k = 4, .n_group = 4, .topk_group = 2, .n_shared = 2, .norm = 0, .rsf = 2.5f },
	{ "gpt-oss-20b routing, inputs past the clamp", MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, .H = 96,
	  .I = 40, .E = 32, .k = 4, .norm = -1, .x_scale = 8.0f, .quick = true },
	{ "gpt-oss-120b routing, 128 experts", MOE_ARCH_GPT_OSS, MOE_DTYPE_F32, .H = 66, .I = 26,
	  .E = 128, .k = 4, .norm = -1, .x_scale = 4.0f },
	{ "gpt-oss, vector loads, cuBLAS at 1024 tokens", MOE_ARCH_GPT_OSS, MOE_DTYPE_BF16, .H = 128,
	  .I = 64, .E = 8, .k = 2, .norm = -1, .x_scale = 8.0f },
	/* FP8: gen-model --quant fp8, every MLP matrix quantized as DeepSeek-V3 is released */
	{ "partial 128 x 128 blocks, scalar loads", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_FP8_E4M3_B128, .H = 200,
	  .I = 72, .E = 32, .k = 4, .n_group = 4, .topk_group = 2, .n_shared = 1, .norm = 1, .rsf = 2.5f,
	  .quick = true },
	{ "vector loads, partial row blocks, cuBLAS at 1024 tokens", MOE_ARCH_QWEN3_MOE,
	  MOE_DTYPE_FP8_E4M3_B128, .H = 256, .I = 144, .E = 16, .k = 4, .norm = 1, .quick = true },
	{ "FP8 shared expert, GLM-4.5-Air routing", MOE_ARCH_GLM4_MOE, MOE_DTYPE_FP8_E4M3_B128, .H = 128,
	  .I = 48, .E = 32, .k = 4, .n_shared = 1, .norm = -1 },
	{ "FP8 routed experts, bf16 shared expert", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_FP8_E4M3_B128,
	  .H = 256, .I = 144, .E = 16, .k = 4, .n_shared = 1, .norm = 1, .rsf = 2.5f,
	  .mix = MIX_SHARED_BF16, .quick = true },
	{ "bf16 routed experts, FP8 shared expert, H = 200", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_FP8_E4M3_B128,
	  .H = 200, .I = 64, .E = 16, .k = 4, .n_shared = 2, .norm = 1, .rsf = 2.5f,
	  .mix = MIX_ROUTED_BF16 },
	/* MXFP4: gen-model --quant mxfp4, the experts as gpt-oss is released */
	{ "gpt-oss in MXFP4, inputs past the clamp, cuBLAS at 1024 tokens", MOE_ARCH_GPT_OSS, MOE_DTYPE_MXFP4,
	  .H = 128, .I = 64, .E = 8, .k = 2, .norm = -1, .x_scale = 8.0f, .quick = true },
	{ "gpt-oss in MXFP4, 32 experts, partial row blocks", MOE_ARCH_GPT_OSS, MOE_DTYPE_MXFP4, .H = 96,
	  .I = 96, .E = 32, .k = 4, .norm = -1, .x_scale = 4.0f },
	/* int4: gen-model --quant gptq|awq|ct-int4, every MLP matrix */
	{ "GPTQ act-order, groups of 32, cuBLAS at 1024 tokens", MOE_ARCH_QWEN3_MOE, MOE_DTYPE_INT4, .H = 256,
	  .I = 128, .E = 8, .k = 2, .norm = 1, .int4 = "gptq", .q4_group = 32, .q4_desc_act = true,
	  .quick = true },
	{ "GPTQ symmetric, one group a row, shared expert, H = 208", MOE_ARCH_DEEPSEEK_V3, MOE_DTYPE_INT4,
	  .H = 208, .I = 80, .E = 16, .k = 4, .n_shared = 1, .norm = 1, .rsf = 2.5f, .int4 = "gptq",
	  .q4_group = -1, .q4_sym = true, .quick = true },
	{ "AWQ, groups of 32", MOE_ARCH_MIXTRAL, MOE_DTYPE_INT4, .H = 128, .I = 64, .E = 8, .k = 2, .norm = -1,
	  .int4 = "awq", .q4_group = 32 },
	{ "compressed-tensors, sigmoid-gated shared expert", MOE_ARCH_QWEN2_MOE, MOE_DTYPE_INT4, .H = 128,
	  .I = 32, .E = 16, .k = 4, .n_shared = 1, .shared_I = 96, .norm = 0, .int4 = "ct-int4",
	  .q4_group = 32 },
};

static bool quick;
static const char *dev_name = "cuda";   /* the backend under test */

/* One model being checked: its files, engines and failures. */
struct run {
	const struct gcase *c;
	char label[160];
	char *dir;
	char hf[4096], store[4096];
	uint32_t layer2;             /* the other MoE layer */
	struct ref_layer *ref;
	struct moe_engine *cpu, *dev;
	unsigned long failures;
	size_t tokens, exempt;       /* tokens compared, of which near a tie */
	double worst_dev, worst_ref;
};

__attribute__((format(printf, 2, 3)))
static void fail(struct run *r, const char *fmt, ...)
{
	va_list ap;

	if (++r->failures > MAX_REPORTED)
		return;
	fprintf(stderr, "FAIL %s: ", r->label);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* The engine's log (moe_engine_options.log): the CUDA backend's failed
 * calls, shown next to the failure they explain; the pager's notices (no
 * O_DIRECT on tmpfs) are left out. */
static void log_stderr(void *ctx, int level, const char *msg)
{
	(void)ctx;
	if (level <= 3)
		fprintf(stderr, "check_gpu: %s\n", msg);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------ no device */

/*
 * "auto" opens a backend; if it is the CPU's, it says why.  Then "cuda":
 * 1 if it opened (and "auto" must have picked it), 0 if it failed with a
 * reason (printed), -1 on a failure of the contract.
 */
static int probe_backends(void)
{
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	bool auto_cpu;
	int r;

	r = moe_backend_open("auto", NULL, &be, &err);
	if (r < 0) {
		fprintf(stderr, "FAIL: auto backend did not open: %s\n", err.msg);
		return -1;
	}
	auto_cpu = strcmp(be->ops->name, "cpu") == 0;
	if (auto_cpu) {
		if (!be->reason[0]) {
			fprintf(stderr, "FAIL: auto fell back to the CPU without saying why\n");
			moe_backend_close(be);
			return -1;
		}
		printf("auto -> cpu: %s\n", be->reason);
	} else if (be->reason[0]) {
		fprintf(stderr, "FAIL: auto picked %s but gives a fallback reason: %s\n", be->ops->name,
			be->reason);
		moe_backend_close(be);
		return -1;
	}
	moe_backend_close(be);

	be = NULL;
	memset(&err, 0, sizeof(err));
	r = moe_backend_open("cuda", NULL, &be, &err);
	if (r < 0) {
		if (!err.msg[0]) {
			fprintf(stderr, "FAIL: cuda backend failed (%d) without a reason\n", r);
			return -1;
		}
		printf("no CUDA backend: %s\n", err.msg);
		return 0;
	}
	printf("cuda backend opened: %s\n", be->ops->name);
	moe_backend_close(be);
	if (auto_cpu) {
		fprintf(stderr, "FAIL: the cuda backend opens, but auto chose the CPU\n");
		return -1;
	}
	return 1;
}

/* ------------------------------------------------------------------ models */

static void plant_negative_bias(const char *dir, uint32_t layer, char *why, size_t why_len)
{
	moe_test_plant_negative_bias(dir, layer, why, why_len);
}

static uint64_t case_seed(const struct gcase *c)
{
	return 0x69700000u + (uint64_t)c->arch * 131 + (uint64_t)c->dtype * 17 + c->H + c->E;
}

/*
 * Generate the checkpoint of @c (two MoE layers), pack it, load the
 * reference of LAYER and open a CPU and a device engine on the store.
 * 0, or -1 after a failure was reported; 1 when the device backend
 * refused the model as the case expects (nothing more to compare).
 */
static int run_open(struct run *r, const struct gcase *c)
{
	struct moe_gen_options opt;
	struct moe_pack_options popt = { .dtype = -1 };
	struct moe_engine_options eo = { .threads = CPU_THREADS, .log = log_stderr };
	struct moe_err err = { 0 };
	/* the architectures with first_k_dense_replace */
	bool deepseek = c->arch == MOE_ARCH_DEEPSEEK_V2 || c->arch == MOE_ARCH_DEEPSEEK_V3 ||
			c->arch == MOE_ARCH_GLM4_MOE;
	char why[512] = "";
	const char *be;
	int rc;

	memset(r, 0, sizeof(*r));
	r->c = c;
	snprintf(r->label, sizeof(r->label), "%s %s (%s; H=%u I=%u E=%u k=%u)", moe_arch_name(c->arch),
		 moe_dtype_name(c->dtype), c->what, c->H, c->I, c->E, c->k);
	r->dir = moe_test_tmpdir("gpu");
	snprintf(r->hf, sizeof(r->hf), "%s/hf", r->dir);
	snprintf(r->store, sizeof(r->store), "%s/model.moe", r->dir);

	/* FP8, MXFP4, int4: a bf16 checkpoint whose MLP matrices (MXFP4: the
	 * experts) gen-model quantizes */
	moe_test_gen_small(c->arch, moe_dtype_is_blocked(c->dtype) ? MOE_DTYPE_BF16 : c->dtype, &opt);
	opt.quant_fp8 = c->dtype == MOE_DTYPE_FP8_E4M3_B128;
	opt.quant_mxfp4 = c->dtype == MOE_DTYPE_MXFP4;
	if (c->dtype == MOE_DTYPE_INT4) {
		opt.quant_int4 = c->int4;
		opt.q4_group_size = c->q4_group;
		opt.q4_desc_act = c->q4_desc_act;
		opt.q4_sym = c->q4_sym;
	}
	opt.seed = case_seed(c);
	opt.hidden_size = c->H;
	opt.moe_intermediate_size = c->I;
	opt.num_experts = c->E;
	opt.top_k = c->k;
	/* deepseek, glm4_moe: layer 0 dense, 1 and 2 MoE; the others: 0 and 1 MoE */
	opt.num_layers = deepseek ? 3 : 2;
	opt.first_k_dense_replace = deepseek ? 1 : 0;
	opt.intermediate_size = c->arch == MOE_ARCH_MIXTRAL || c->arch == MOE_ARCH_OLMOE ||
				c->arch == MOE_ARCH_GPT_OSS ? 0 : 2 * c->I;
	opt.n_group = c->n_group ? c->n_group : 1;
	opt.topk_group = c->topk_group ? c->topk_group : 1;
	opt.n_shared_experts = c->n_shared;
	opt.shared_intermediate_size = c->shared_I;
	opt.norm_topk_prob = c->norm;
	opt.routed_scaling_factor = c->rsf;
	opt.topk_method = c->topk_method;
	opt.hidden_act = c->act;
	opt.plain_experts = c->plain;
	r->layer2 = deepseek ? 2 : 0;

	rc = moe_gen_model(&opt, r->hf, NULL, NULL, &err);
	if (rc < 0) {
		fail(r, "gen-model failed: %d %s", rc, err.msg);
		return -1;
	}
	if (c->mix) {
		char twin[4096];

		/* the same options and seed without quantization: the same weights in bf16 */
		snprintf(twin, sizeof(twin), "%s/hf-bf16", r->dir);
		opt.quant_fp8 = false;
		rc = moe_gen_model(&opt, twin, NULL, NULL, &err);
		if (rc < 0) {
			fail(r, "gen-model (bf16 twin) failed: %d %s", rc, err.msg);
			return -1;
		}
		if (moe_test_mix_checkpoint(r->hf, twin, c->mix == MIX_SHARED_BF16, why, sizeof(why)) < 0) {
			fail(r, "%s", why);
			return -1;
		}
	}
	if (c->patch) {
		c->patch(r->hf, LAYER, why, sizeof(why));
		if (why[0]) {
			fail(r, "%s", why);
			return -1;
		}
	}
	rc = moe_pack(r->hf, r->store, &popt, &err);
	if (rc < 0) {
		fail(r, "pack failed: %d %s", rc, err.msg);
		return -1;
	}
	rc = ref_layer_load(r->hf, LAYER, &r->ref, why, sizeof(why));
	if (rc < 0) {
		fail(r, "the reference cannot load layer %u: %s", LAYER, why);
		return -1;
	}
	if (r->ref->routing.num_experts != c->E || r->ref->routing.top_k != c->k ||
	    r->ref->hidden != c->H || (r->ref->shared_inter != 0) != (c->n_shared != 0) ||
	    r->ref->gated == c->plain) {
		fail(r, "the checkpoint is not the one asked for: E=%u k=%u H=%u shared %u gated %d",
		     r->ref->routing.num_experts, r->ref->routing.top_k, r->ref->hidden,
		     r->ref->shared_inter, r->ref->gated);
		return -1;
	}

	eo.backend = "cpu";
	rc = moe_engine_open(r->store, &eo, &r->cpu, &err);
	if (rc < 0) {
		fail(r, "CPU engine open failed: %d %s", rc, err.msg);
		return -1;
	}
	{
		/* the store holds the dtypes asked for (else the case tests nothing) */
		const struct moe_model_config *mc = moe_engine_config(r->cpu);
		enum moe_dtype wr = c->mix == MIX_ROUTED_BF16 ? MOE_DTYPE_BF16 : c->dtype;
		enum moe_dtype ws = c->mix == MIX_SHARED_BF16 ? MOE_DTYPE_BF16 : c->dtype;

		if (mc->weight_dtype != wr || (c->n_shared && mc->shared_dtype != ws)) {
			fail(r, "the store's experts are %s, shared %s: not the dtypes asked for",
			     moe_dtype_name(mc->weight_dtype), moe_dtype_name(mc->shared_dtype));
			return -1;
		}
	}
	eo.backend = dev_name;
	rc = moe_engine_open(r->store, &eo, &r->dev, &err);
	if (c->cuda_refuses && !strcmp(dev_name, "cuda")) {
		if (rc == 0) {
			fail(r, "the CUDA backend opened a model it cannot compute");
			return -1;
		}
		if (!strstr(err.msg, "has no kernels for")) {
			fail(r, "the CUDA backend refused with \"%s\", not the reason", err.msg);
			return -1;
		}
		return 1;
	}
	if (rc < 0) {
		fail(r, "%s engine open failed: %d %s", dev_name, rc, err.msg);
		return -1;
	}
	be = moe_engine_backend(r->dev)->ops->name;
	if (strcmp(be, dev_name)) {
		fail(r, "an engine opened with backend \"%s\" runs on %s", dev_name, be);
		return -1;
	}
	return 0;
}

static void run_close(struct run *r)
{
	moe_engine_close(r->dev);
	moe_engine_close(r->cpu);
	ref_layer_free(r->ref);
	if (r->dir) {
		moe_test_rm_rf(r->dir);
		free(r->dir);
	}
}

/* ------------------------------------------------------------------ routing */

/*
 * The scores top-k ranks for one token, in float64 from the checkpoint's
 * router (and correction bias): softmax of the logits, or for deepseek_v3
 * and glm4_moe sigmoid plus bias.  s[E].
 */
static void selection_scores(const struct ref_layer *ref, const float *x, double *s)
{
	uint32_t E = ref->routing.num_experts, H = ref->hidden;
	double mx = -INFINITY, sum = 0.0;

	for (uint32_t e = 0; e < E; e++) {
		double l = 0.0;

		for (uint32_t h = 0; h < H; h++)
			l += ref->router[(size_t)e * H + h] * (double)x[h];
		s[e] = l;
		if (l > mx)
			mx = l;
	}
	if (ref->routing.arch == MOE_ARCH_DEEPSEEK_V3 || ref->routing.arch == MOE_ARCH_GLM4_MOE) {
		for (uint32_t e = 0; e < E; e++)
			s[e] = 1.0 / (1.0 + exp(-s[e])) + (ref->bias ? ref->bias[e] : 0.0);
		return;
	}
	if (ref->routing.arch == MOE_ARCH_GPT_OSS) {
		/* top-k of the biased logits themselves */
		for (uint32_t e = 0; e < E; e++)
			s[e] += ref->bias ? ref->bias[e] : 0.0;
		return;
	}
	for (uint32_t e = 0; e < E; e++) {
		s[e] = exp(s[e] - mx);
		sum += s[e];
	}
	for (uint32_t e = 0; e < E; e++)
		s[e] /= sum;
}

static bool same_set(uint32_t k, const int32_t *a, const int32_t *b)
{
	for (uint32_t i = 0; i < k; i++) {
		uint32_t j;

		for (j = 0; j < k && b[j] != a[i]; j++)
			;
		if (j == k)
			return false;
	}
	return true;
}

static void format_ids(char *buf, size_t len, uint32_t k, const int32_t *ids)
{
	size_t off = 0;

	buf[0] = '\0';
	for (uint32_t s = 0; s < k && off < len; s++)
		off += (size_t)snprintf(buf + off, len - off, "%s%d", s ? " " : "", ids[s]);
}

/* ------------------------------------------------------------------ one model */

/* Buffers for the largest batch. */
struct bufs {
	float *x;                    /* [MAX_TOKENS][H] */
	float *cpu, *dev, *again, *base;
	int32_t *cpu_ids, *dev_ids, *again_ids, *base_ids;
	float *cpu_w, *dev_w, *again_w, *base_w;
	double *want, *scores;
};

static int bufs_alloc(struct bufs *b, uint32_t H, uint32_t k, uint32_t E)
{
	size_t nh = (size_t)MAX_TOKENS * H, nk = (size_t)MAX_TOKENS * k;

	memset(b, 0, sizeof(*b));
	b->x = malloc(nh * sizeof(float));
	b->cpu = malloc(nh * sizeof(float));
	b->dev = malloc(nh * sizeof(float));
	b->again = malloc(nh * sizeof(float));
	b->base = malloc(nh * sizeof(float));
	b->cpu_ids = malloc(nk * sizeof(int32_t));
	b->dev_ids = malloc(nk * sizeof(int32_t));
	b->again_ids = malloc(nk * sizeof(int32_t));
	b->base_ids = malloc(nk * sizeof(int32_t));
	b->cpu_w = malloc(nk * sizeof(float));
	b->dev_w = malloc(nk * sizeof(float));
	b->again_w = malloc(nk * sizeof(float));
	b->base_w = malloc(nk * sizeof(float));
	b->want = malloc(H * sizeof(double));
	b->scores = malloc(E * sizeof(double));
	return b->x && b->cpu && b->dev && b->again && b->base && b->cpu_ids && b->dev_ids &&
	       b->again_ids && b->base_ids && b->cpu_w && b->dev_w && b->again_w && b->base_w &&
	       b->want && b->scores ? 0 : -ENOMEM;
}

static void bufs_free(struct bufs *b)
{
	free(b->x);
	free(b->cpu);
	free(b->dev);
	free(b->again);
	free(b->base);
	free(b->cpu_ids);
	free(b->dev_ids);
	free(b->again_ids);
	free(b->base_ids);
	free(b->cpu_w);
	free(b->dev_w);
	free(b->again_w);
	free(b->base_w);
	free(b->want);
	free(b->scores);
}

/* Forward @n tokens; a failure is reported and returns -1. */
static int forward(struct run *r, struct moe_engine *e, const char *which, uint32_t layer,
		   const float *x, uint32_t n, float *out, int32_t *ids, float *w, unsigned flags)
{
	struct moe_err err = { 0 };
	int rc;

	memset(ids, 0xff, sizeof(int32_t) * n * r->c->k);
	rc = moe_engine_forward(e, layer, x, n, out, ids, w, flags, &err);
	if (rc < 0) {
		fail(r, "%s forward of layer %u, batch %u%s failed: %d %s", which, layer, n,
		     flags & MOE_FWD_ALL_EXPERTS ? " (all experts)" : "", rc, err.msg);
		return -1;
	}
	return 0;
}

/*
 * One token of a batch of @n on LAYER: the device's routing against the
 * CPU's and the reference's, its output against both.
 */
static void check_token(struct run *r, struct bufs *b, uint32_t n, uint32_t t)
{
	const struct gcase *c = r->c;
	uint32_t H = c->H, k = c->k;
	const float *x = b->x + (size_t)t * H;
	const float *dv = b->dev + (size_t)t * H, *cv = b->cpu + (size_t)t * H;
	const int32_t *di = b->dev_ids + (size_t)t * k, *ci = b->cpu_ids + (size_t)t * k;
	const float *dw = b->dev_w + (size_t)t * k, *cw = b->cpu_w + (size_t)t * k;
	int32_t rid[REF_MAX_EXPERTS];
	double rw[REF_MAX_EXPERTS], margin, rel;
	char msg[512], a[256], z[256];
	bool near_tie;

	r->tokens++;
	ref_layer_forward(r->ref, x, b->want, rid, rw, &margin);
	near_tie = margin < TIE_MARGIN;
	if (near_tie)
		r->exempt++;
	for (uint32_t s = 0; c->ids_below && s < k; s++)
		if (di[s] < 0 || (uint32_t)di[s] >= c->ids_below)
			fail(r, "batch %u, token %u: slot %u is expert %d, outside the kept groups "
			     "(experts < %u)", n, t, s, di[s], c->ids_below);

	/* the same experts as the CPU backend, in the same slots */
	if (!same_set(k, di, ci)) {
		if (!near_tie) {
			format_ids(a, sizeof(a), k, di);
			format_ids(z, sizeof(z), k, ci);
			fail(r, "batch %u, token %u: %s chose experts %s, the CPU %s (selection "
			     "margin %.3g, not a tie)", n, t, dev_name, a, z, margin);
		}
		return;   /* near a tie: different experts, different outputs */
	}
	if (memcmp(di, ci, sizeof(int32_t) * k)) {
		selection_scores(r->ref, x, b->scores);
		for (uint32_t s = 0; s < k; s++) {
			double gap;

			if (di[s] == ci[s])
				continue;
			gap = fabs(b->scores[di[s]] - b->scores[ci[s]]);
			if (gap >= TIE_MARGIN) {
				format_ids(a, sizeof(a), k, di);
				format_ids(z, sizeof(z), k, ci);
				fail(r, "batch %u, token %u: %s's expert order %s, the CPU's %s: slot %u "
				     "holds %d instead of %d, whose scores differ by %.3g (not a tie)",
				     n, t, dev_name, a, z, s, di[s], ci[s], gap);
				break;
			}
		}
	}
	for (uint32_t s = 0; s < k; s++) {
		uint32_t g;

		for (g = 0; g < k && di[g] != ci[s]; g++)
			;
		if (!(fabs((double)dw[g] - (double)cw[s]) <= WEIGHT_RTOL * fabs((double)cw[s]) + 1e-30)) {
			fail(r, "batch %u, token %u: expert %d has weight %.9g, on the CPU %.9g (rtol %g)",
			     n, t, ci[s], (double)dw[g], (double)cw[s], WEIGHT_RTOL);
			break;
		}
	}

	/* the output against the CPU backend's */
	{
		double d2 = 0.0, c2 = 0.0;

		for (uint32_t h = 0; h < H; h++) {
			double d = (double)dv[h] - (double)cv[h];

			d2 += d * d;
			c2 += (double)cv[h] * (double)cv[h];
		}
		rel = c2 > 0.0 ? sqrt(d2 / c2) : sqrt(d2);
	}
	if (rel > r->worst_dev)
		r->worst_dev = rel;
	if (!(rel <= DEV_RTOL))
		fail(r, "batch %u, token %u: relative L2 error %.3g against the CPU backend > %g "
		     "(out[0] %.9g, CPU %.9g)", n, t, rel, DEV_RTOL, (double)dv[0], (double)cv[0]);

	/* the numerical contract against float64 */
	if (near_tie)
		return;
	if (ref_routing_diff(k, di, dw, rid, rw, WEIGHT_RTOL, msg, sizeof(msg)) < 0) {
		fail(r, "batch %u, token %u: routing against the float64 reference: %s (margin %.3g)",
		     n, t, msg, margin);
		return;
	}
	rel = ref_rel_l2(dv, b->want, H);
	if (rel > r->worst_ref)
		r->worst_ref = rel;
	if (!(rel <= REF_RTOL))
		fail(r, "batch %u, token %u: relative L2 error %.3g against the float64 reference > %g "
		     "(out[0] %.9g, reference %.9g)", n, t, rel, REF_RTOL, (double)dv[0], b->want[0]);
}

/* Where two runs' bits differ: the first token and what differs in it. */
static void compare_bits(struct run *r, const char *what, uint32_t n, uint32_t H, uint32_t k,
			 const float *o1, const int32_t *i1, const float *w1,
			 const float *o2, const int32_t *i2, const float *w2)
{
	for (uint32_t t = 0; t < n; t++) {
		const char *part = NULL;
		size_t at = 0;

		if (memcmp(i1 + (size_t)t * k, i2 + (size_t)t * k, sizeof(int32_t) * k)) {
			part = "experts";
		} else if (memcmp(w1 + (size_t)t * k, w2 + (size_t)t * k, sizeof(float) * k)) {
			part = "weights";
		} else if (memcmp(o1 + (size_t)t * H, o2 + (size_t)t * H, sizeof(float) * H)) {
			part = "output";
			while (at < H && !memcmp(&o1[(size_t)t * H + at], &o2[(size_t)t * H + at],
						 sizeof(float)))
				at++;
		}
		if (part) {
			if (at < H && !strcmp(part, "output"))
				fail(r, "%s, batch %u, token %u: the output bits differ (out[%zu] %a "
				     "vs %a)", what, n, t, at, (double)o1[(size_t)t * H + at],
				     (double)o2[(size_t)t * H + at]);
			else
				fail(r, "%s, batch %u, token %u: the %s differ", what, n, t, part);
			return;
		}
	}
}

/* gpu/launch.cu's MOE_GEMM_MIN_TOKENS: experts with fewer tokens run the
 * weight-streaming kernels, whose sums have a fixed order. */
#define INVARIANT_BELOW 64

/* Every batch size on LAYER: against the CPU and the reference, twice,
 * and below INVARIANT_BELOW against the largest such batch's bits. */
static void check_batches(struct run *r, struct bufs *b)
{
	uint32_t base_n = 0;

	const struct gcase *c = r->c;
	const uint32_t *sizes = quick ? batches_quick : batches_full;
	size_t nsizes = quick ? sizeof(batches_quick) / sizeof(batches_quick[0])
			      : sizeof(batches_full) / sizeof(batches_full[0]);
	uint32_t H = c->H, k = c->k;

	for (size_t bi = 0; bi < nsizes; bi++) {
		uint32_t n = sizes[bi];
		char what[64];

		if (forward(r, r->cpu, "CPU", LAYER, b->x, n, b->cpu, b->cpu_ids, b->cpu_w, 0) < 0 ||
		    forward(r, r->dev, dev_name, LAYER, b->x, n, b->dev, b->dev_ids, b->dev_w, 0) < 0 ||
		    forward(r, r->dev, dev_name, LAYER, b->x, n, b->again, b->again_ids, b->again_w,
			    0) < 0)
			return;
		for (uint32_t t = 0; t < n; t++)
			check_token(r, b, n, t);
		compare_bits(r, "the same batch twice", n, H, k, b->dev, b->dev_ids, b->dev_w,
			     b->again, b->again_ids, b->again_w);
		if (n >= INVARIANT_BELOW)
			continue;
		if (!base_n) {
			base_n = n;
			memcpy(b->base, b->dev, sizeof(float) * n * H);
			memcpy(b->base_ids, b->dev_ids, sizeof(int32_t) * n * k);
			memcpy(b->base_w, b->dev_w, sizeof(float) * n * k);
		} else {
			snprintf(what, sizeof(what), "batch invariance (against the batch of %u)", base_n);
			compare_bits(r, what, n, H, k, b->dev, b->dev_ids, b->dev_w, b->base,
				     b->base_ids, b->base_w);
		}
	}
}

/* MOE_FWD_ALL_EXPERTS: kk = E slots per token, the shared experts added. */
static void check_all_experts(struct run *r, struct bufs *b)
{
	uint32_t H = r->c->H, n = DENSE_TOKENS;

	if (forward(r, r->cpu, "CPU", LAYER, b->x, n, b->cpu, b->cpu_ids, b->cpu_w,
		    MOE_FWD_ALL_EXPERTS) < 0 ||
	    forward(r, r->dev, dev_name, LAYER, b->x, n, b->dev, b->dev_ids, b->dev_w,
		    MOE_FWD_ALL_EXPERTS) < 0)
		return;
	for (uint32_t t = 0; t < n; t++) {
		const float *dv = b->dev + (size_t)t * H;
		double d2 = 0.0, c2 = 0.0, rel;

		for (uint32_t h = 0; h < H; h++) {
			double d = (double)dv[h] - (double)b->cpu[(size_t)t * H + h];

			d2 += d * d;
			c2 += (double)b->cpu[(size_t)t * H + h] * (double)b->cpu[(size_t)t * H + h];
		}
		rel = c2 > 0.0 ? sqrt(d2 / c2) : sqrt(d2);
		if (!(rel <= DEV_RTOL))
			fail(r, "all experts, token %u: relative L2 error %.3g against the CPU backend "
			     "> %g", t, rel, DEV_RTOL);
		ref_layer_forward_dense(r->ref, b->x + (size_t)t * H, b->want);
		rel = ref_rel_l2(dv, b->want, H);
		if (!(rel <= REF_RTOL))
			fail(r, "all experts, token %u: relative L2 error %.3g against the float64 dense "
			     "reference > %g", t, rel, REF_RTOL);
	}
}

/*
 * Paging.  The engine options have a host budget but no device budget
 * (engine.h, backend.h), so what is paged here is the host tier: a budget
 * of a few expert slots, prefetching on, both MoE layers in turn.  A device
 * budget, when the options grow one, belongs in this same comparison.
 */
static void check_paging(struct run *r, struct bufs *b)
{
	static const uint32_t steps_full[] = { 64, 1, 300, 1024, 3 };
	static const uint32_t steps_quick[] = { 64, 1 };
	const uint32_t *steps = quick ? steps_quick : steps_full;
	size_t nsteps = quick ? sizeof(steps_quick) / sizeof(steps_quick[0])
			      : sizeof(steps_full) / sizeof(steps_full[0]);
	const struct gcase *c = r->c;
	struct moe_engine_options eo = { .backend = dev_name, .threads = CPU_THREADS,
					 .prefetch = true, .log = log_stderr };
	struct moe_engine_stats st;
	struct moe_engine *small = NULL;
	struct moe_err err = { 0 };
	uint32_t H = c->H, k = c->k, slots = c->E / 8 > 2 ? c->E / 8 : 2;
	int rc;

	moe_engine_get_stats(r->dev, &st, NULL);
	eo.host_bytes = st.host_fixed + (uint64_t)slots * st.slot_bytes;
	rc = moe_engine_open(r->store, &eo, &small, &err);
	if (rc < 0) {
		fail(r, "%s engine with a host budget of %u slots (%llu bytes) did not open: %d %s",
		     dev_name, slots, (unsigned long long)eo.host_bytes, rc, err.msg);
		return;
	}
	for (size_t i = 0; i < 2 * nsteps; i++) {
		uint32_t n = steps[i % nsteps], layer = i % 2 ? r->layer2 : LAYER;
		/* a different stretch of the input each step */
		const float *x = b->x + (size_t)((i * 97) % (MAX_TOKENS - n + 1)) * H;
		char what[96];

		if (forward(r, r->dev, dev_name, layer, x, n, b->dev, b->dev_ids, b->dev_w, 0) < 0 ||
		    forward(r, small, "paged", layer, x, n, b->again, b->again_ids, b->again_w, 0) < 0)
			break;
		snprintf(what, sizeof(what), "paging (%u host slots), step %zu, layer %u", slots, i,
			 layer);
		compare_bits(r, what, n, H, k, b->dev, b->dev_ids, b->dev_w, b->again, b->again_ids,
			     b->again_w);
	}
	moe_engine_get_stats(small, &st, NULL);
	if (st.slots != slots)
		fail(r, "paging: a budget for %u slots gave %u", slots, st.slots);
	if (st.total.evictions == 0 || st.total.loads <= c->E)
		fail(r, "paging: %u slots for 2 x %u experts, but %llu evictions and %llu loads: the "
		     "check proves nothing", slots, c->E, (unsigned long long)st.total.evictions,
		     (unsigned long long)st.total.loads);
	moe_engine_close(small);
}

static void run_case(const struct gcase *c, unsigned long *failures)
{
	struct run r;
	struct bufs b;
	struct moe_engine_stats st;
	uint64_t xs;
	double t0 = now_s();
	float xsc = c->x_scale > 0.0f ? c->x_scale : 1.0f;
	int rc;

	memset(&b, 0, sizeof(b));
	rc = run_open(&r, c);
	if (rc == 1) {
		printf("ok   %-74s refused by %s at open, as it must be\n", r.label, dev_name);
		fflush(stdout);
		run_close(&r);
		return;
	}
	if (rc < 0 || bufs_alloc(&b, c->H, c->k, c->E) < 0) {
		if (!r.failures)
			fail(&r, "out of memory");
		*failures += r.failures;
		bufs_free(&b);
		run_close(&r);
		return;
	}
	xs = case_seed(c) ^ 0xabcdefu;
	for (size_t i = 0; i < (size_t)MAX_TOKENS * c->H; i++)
		b.x[i] = xsc * (float)moe_test_randf(&xs);

	check_batches(&r, &b);
	check_all_experts(&r, &b);
	check_paging(&r, &b);
	if (r.exempt * 20 > r.tokens)
		fail(&r, "%zu of %zu tokens within %g of a tie: the model is too degenerate to test "
		     "anything", r.exempt, r.tokens, TIE_MARGIN);

	moe_engine_get_stats(r.dev, &st, NULL);
	if (r.failures > MAX_REPORTED)
		fprintf(stderr, "FAIL %s: %lu failures in all, the first %d above\n", r.label,
			r.failures, MAX_REPORTED);
	printf("%-4s %-74s %5zu tokens, %zu near a tie; worst relative L2 %.2g vs cpu, %.2g vs "
	       "float64; device tier %llu hits %llu misses; %.1f s\n", r.failures ? "FAIL" : "ok",
	       r.label, r.tokens, r.exempt, r.worst_dev, r.worst_ref,
	       (unsigned long long)st.total.device_hits, (unsigned long long)st.total.device_misses,
	       now_s() - t0);
	fflush(stdout);
	*failures += r.failures;
	bufs_free(&b);
	run_close(&r);
}

/*
 * moe_backend_selftest(), which the CUDA backend must pass before it
 * serves: here on the CPU backend against itself (it must pass), and with
 * MOE_BACKEND_SELFTEST_FAULT=1 (it must fail and say where).
 */
static int selftest_checks(void)
{
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	int r;

	if (moe_backend_open("cpu", NULL, &be, &err) < 0) {
		fprintf(stderr, "FAIL: the cpu backend did not open: %s\n", err.msg);
		return -1;
	}
	r = moe_backend_selftest(be, &err);
	if (r < 0) {
		fprintf(stderr, "FAIL: the CPU backend fails the self-test against itself: %s\n", err.msg);
		moe_backend_close(be);
		return -1;
	}
	setenv("MOE_BACKEND_SELFTEST_FAULT", "1", 1);
	moe_err_clear(&err);
	r = moe_backend_selftest(be, &err);
	unsetenv("MOE_BACKEND_SELFTEST_FAULT");
	moe_backend_close(be);
	if (r != -EIO || !strstr(err.msg, "relative L2")) {
		fprintf(stderr, "FAIL: a perturbed output passed the self-test (%d: %s)\n", r, err.msg);
		return -1;
	}
	printf("self-test: passes on the CPU backend, catches a perturbed output (%s)\n", err.msg);
	return 0;
}

int main(void)
{
	const char *q = getenv("MOE_GPU_TEST_QUICK"), *be = getenv("MOE_GPU_TEST_BACKEND");
	unsigned long failures = 0;
	size_t ran = 0;
	int r;

	quick = q && *q && strcmp(q, "0");
	if (be && *be)
		dev_name = be;

	if (selftest_checks() < 0)
		return 1;
	r = probe_backends();
	if (r < 0)
		return 1;
	if (r == 0 && !strcmp(dev_name, "cuda")) {
		printf("SKIP: no usable CUDA device\n");
		return 77;
	}
	printf("comparing backend %s with the CPU backend%s\n", dev_name,
	       quick ? " (MOE_GPU_TEST_QUICK: fewer models and batch sizes)" : "");

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (quick && !cases[i].quick)
			continue;
		run_case(&cases[i], &failures);
		ran++;
	}
	if (failures) {
		fprintf(stderr, "FAIL: %lu failures over %zu models\n", failures, ran);
		return 1;
	}
	printf("PASS: %zu models\n", ran);
	return 0;
}
