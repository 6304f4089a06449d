/* SPDX-License-Identifier: MIT */
/*
 * Backend modules carry the ABI they were built for
 * (MOE_BACKEND_ABI_VERSION and the size of the ops table): a module of
 * another version, another ops size or none (fake_module.c, whose ops
 * abort if called) is refused when it is opened, with a message that
 * names the module and both versions, and "auto" falls back to the CPU
 * and gives that message as its reason.  The real CUDA module refuses the
 * expert dtypes it has no kernels for, and accepts the others.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/backend.h"
#include "engine/err.h"
#include "testutil.h"

#ifndef FAKE_MODULE_DIR
#error "FAKE_MODULE_DIR: where libtool puts the fake modules"
#endif

/*
 * A fresh directory holding the fake module @lib as moe-backend-cuda.so,
 * made $MOE_BACKEND_DIR; its path in @path.
 */
static void install_fake(const char *lib, char *path, size_t len)
{
	char *dir = moe_test_tmpdir("module");
	char src[PATH_MAX];

	snprintf(src, sizeof(src), "%s/%s", FAKE_MODULE_DIR, lib);
	ck_assert_msg(access(src, R_OK) == 0, "no fake module at %s", src);
	snprintf(path, len, "%s/moe-backend-cuda.so", dir);
	ck_assert_msg(symlink(src, path) == 0, "symlink %s: %s", path, strerror(errno));
	setenv("MOE_BACKEND_DIR", dir, 1);
	free(dir);
}

/* "cuda" refuses the module in $MOE_BACKEND_DIR; the message has each of @want. */
static void cuda_refuses(const char *path, const char *const *want)
{
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	int r = moe_backend_open("cuda", NULL, &be, &err);

	ck_assert_msg(r == -ENODEV, "opening %s gave %d (%s), not -ENODEV", path, r, err.msg);
	ck_assert_ptr_null(be);
	ck_assert_msg(strstr(err.msg, path), "the message does not name %s: %s", path, err.msg);
	for (; *want; want++)
		ck_assert_msg(strstr(err.msg, *want), "the message does not say \"%s\": %s", *want, err.msg);
}

/* "auto" opens the CPU backend, its reason naming the module and each of @want. */
static void auto_falls_back(const char *path, const char *const *want)
{
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	int r = moe_backend_open("auto", NULL, &be, &err);

	ck_assert_msg(r == 0, "auto did not open: %d %s", r, err.msg);
	ck_assert_str_eq(be->ops->name, "cpu");
	ck_assert_msg(strstr(be->reason, path), "the fallback reason does not name %s: %s", path, be->reason);
	for (; *want; want++)
		ck_assert_msg(strstr(be->reason, *want), "the fallback reason does not say \"%s\": %s", *want,
			      be->reason);
	moe_backend_close(be);
}

/* "version V (ops table of S bytes)" and "needs version V' (ops table of S' bytes)" */
static void versions(char *mod, size_t ml, char *ours, size_t ol, unsigned version, size_t size)
{
	snprintf(mod, ml, "ABI version %u (ops table of %zu bytes)", version, size);
	snprintf(ours, ol, "needs version %u (ops table of %zu bytes)", MOE_BACKEND_ABI_VERSION,
		 sizeof(struct moe_backend_ops));
}

START_TEST(refuses_module_of_another_version)
{
	char path[PATH_MAX], mod[128], ours[128];
	const char *want[] = { mod, ours, NULL };

	install_fake("fake-module-version.so", path, sizeof(path));
	versions(mod, sizeof(mod), ours, sizeof(ours), MOE_BACKEND_ABI_VERSION + 1,
		 sizeof(struct moe_backend_ops));
	cuda_refuses(path, want);
	auto_falls_back(path, want);
}
END_TEST

START_TEST(refuses_module_of_another_ops_size)
{
	char path[PATH_MAX], mod[128], ours[128];
	const char *want[] = { mod, ours, NULL };

	install_fake("fake-module-size.so", path, sizeof(path));
	versions(mod, sizeof(mod), ours, sizeof(ours), MOE_BACKEND_ABI_VERSION,
		 sizeof(struct moe_backend_ops) + sizeof(void *));
	cuda_refuses(path, want);
	auto_falls_back(path, want);
}
END_TEST

START_TEST(refuses_module_without_version)
{
	char path[PATH_MAX], mod[128], ours[128];
	const char *want[] = { "has no ABI version", ours, NULL };

	install_fake("fake-module-unversioned.so", path, sizeof(path));
	versions(mod, sizeof(mod), ours, sizeof(ours), 0, 0);
	cuda_refuses(path, want);
	auto_falls_back(path, want);
}
END_TEST

/* The real CUDA module ($MOE_BACKEND_DIR as the test harness sets it)
 * refuses a model whose routed experts, or whose shared expert, are of a
 * dtype it has no kernels for (an allowlist: a dtype number past the
 * store's, as a later store could write), by its supports entry, before it
 * looks for a device (so this runs without a GPU): "cuda" fails saying
 * why, "auto" serves it on the CPU saying why. */
START_TEST(cuda_module_refuses_unknown_dtypes_before_the_device)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	struct moe_model_config cfg = {
		.arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 256, .moe_intermediate_size = 128,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.n_shared_experts = 1, .shared_intermediate_size = 128,
		.scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC, .has_bias = true,
		.gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16,
	};
	struct moe_backend_options o = { .threads = 1, .model = &cfg };
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/moe-backend-cuda.so", dir ? dir : "");
	if (!dir || access(path, R_OK) != 0) {
		printf("no CUDA module at %s: its dtype refusal is not tested\n", path);
		return;
	}
	for (int dt = MOE_DTYPE_COUNT; dt <= MOE_DTYPE_COUNT + 100; dt += 100)
		for (int shared_only = 0; shared_only < 2; shared_only++) {
			struct moe_backend *be = NULL;
			struct moe_err err = { 0 };
			char num[32];
			int r;

			cfg.weight_dtype = shared_only ? MOE_DTYPE_FP8_E4M3_B128 : (enum moe_dtype)dt;
			cfg.shared_dtype = (enum moe_dtype)dt;
			snprintf(num, sizeof(num), "dtype %d", dt);
			r = moe_backend_open("cuda", &o, &be, &err);
			ck_assert_msg(r == -ENOTSUP, "cuda on dtype %d gave %d (%s), not -ENOTSUP", dt, r, err.msg);
			ck_assert_ptr_null(be);
			ck_assert_msg(strstr(err.msg, "no kernels for") && strstr(err.msg, num) &&
				      strstr(err.msg, shared_only ? "shared" : "routed"), "the reason: %s", err.msg);
			r = moe_backend_open("auto", &o, &be, &err);
			ck_assert_msg(r == 0, "auto did not open: %d %s", r, err.msg);
			ck_assert_str_eq(be->ops->name, "cpu");
			ck_assert_msg(strstr(be->reason, "no kernels for"), "the fallback reason: %s", be->reason);
			moe_backend_close(be);
		}
}
END_TEST

/* What the CUDA backend computes passes its supports entry: FP8 and INT4
 * experts, a shared expert in FP8 or INT4 with bf16 routed ones and the
 * other way round, and gpt_oss's biased experts in bf16 and MXFP4.  Without a device the open then fails for want
 * of one (-ENODEV), never -ENOTSUP; with one it opens (after its
 * self-test). */
START_TEST(cuda_module_accepts_fp8_and_gpt_oss)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	const struct moe_model_config base = {
		.arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 256, .moe_intermediate_size = 128,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.n_shared_experts = 1, .shared_intermediate_size = 128,
		.scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC, .has_bias = true,
		.gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
	};
	const struct moe_model_config oss = {
		.arch = MOE_ARCH_GPT_OSS, .hidden_size = 64, .moe_intermediate_size = 32,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY, .has_bias = true,
		.gated = true, .has_expert_bias = true, .act = MOE_ACT_SWIGLU_OAI,
		.swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16,
	};
	const enum moe_dtype pairs[][2] = {
		{ MOE_DTYPE_FP8_E4M3_B128, MOE_DTYPE_FP8_E4M3_B128 },
		{ MOE_DTYPE_FP8_E4M3_B128, MOE_DTYPE_BF16 },
		{ MOE_DTYPE_BF16, MOE_DTYPE_FP8_E4M3_B128 },
		{ MOE_DTYPE_INT4, MOE_DTYPE_INT4 },
		{ MOE_DTYPE_INT4, MOE_DTYPE_BF16 },
		{ MOE_DTYPE_BF16, MOE_DTYPE_INT4 },
	};
	const size_t np = sizeof(pairs) / sizeof(pairs[0]);
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/moe-backend-cuda.so", dir ? dir : "");
	if (!dir || access(path, R_OK) != 0) {
		printf("no CUDA module at %s: what it accepts is not tested\n", path);
		return;
	}
	/* the pairs, then gpt_oss in bf16 and in MXFP4 */
	for (size_t i = 0; i < np + 2; i++) {
		struct moe_model_config cfg = i < np ? base : oss;
		struct moe_backend_options o = { .threads = 1, .model = &cfg };
		struct moe_backend *be = NULL;
		struct moe_err err = { 0 };
		int r;

		if (i < np) {
			cfg.weight_dtype = pairs[i][0];
			cfg.shared_dtype = pairs[i][1];
			/* int4: groups of 32 with zero points and act-order */
			if (cfg.weight_dtype == MOE_DTYPE_INT4 || cfg.shared_dtype == MOE_DTYPE_INT4) {
				cfg.q4_group = 32;
				cfg.q4_flags = MOE_Q4_ZEROS | MOE_Q4_PERM;
			}
		} else if (i == np + 1) {
			cfg.weight_dtype = cfg.shared_dtype = MOE_DTYPE_MXFP4;
		}
		r = moe_backend_open("cuda", &o, &be, &err);
		ck_assert_msg(r != -ENOTSUP && !strstr(err.msg, "no kernels"),
			      "cuda refused %s (%s routed, %s shared): %d %s", moe_arch_name(cfg.arch),
			      moe_dtype_name(cfg.weight_dtype), moe_dtype_name(cfg.shared_dtype), r, err.msg);
		if (r == 0) {
			ck_assert_str_eq(be->ops->name, "cuda");
			moe_backend_close(be);
		} else {
			ck_assert_int_eq(r, -ENODEV);
		}
	}
}
END_TEST

/*
 * The self-test runs the layers the model needs, and only those: checked
 * on the CPU backend standing in for a device one, with
 * MOE_BACKEND_SELFTEST_FAULT spoiling one kind of layer.  A bf16 model
 * must not be failed by a spoiled FP8 or gpt_oss layer (so a broken FP8
 * kernel cannot take the device from it); an FP8 model and a gpt_oss one
 * must be, naming the layer; an unspoiled run passes.
 */
START_TEST(selftest_runs_the_layers_the_model_needs)
{
	const struct moe_model_config bf16 = {
		.arch = MOE_ARCH_QWEN3_MOE, .hidden_size = 64, .moe_intermediate_size = 32,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY, .gated = true,
		.act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16,
	};
	struct moe_model_config fp8 = bf16, fp8_shared = bf16, oss = bf16, mxfp4 = bf16, int4 = bf16;
	struct moe_model_config int4_shared = bf16;
	struct moe_backend_options o = { .threads = 1 };
	struct moe_backend *cpu = NULL;
	struct moe_err err = { 0 };

	fp8.weight_dtype = MOE_DTYPE_FP8_E4M3_B128;
	fp8_shared.n_shared_experts = 1;
	fp8_shared.shared_intermediate_size = 32;
	fp8_shared.shared_dtype = MOE_DTYPE_FP8_E4M3_B128;
	oss.arch = MOE_ARCH_GPT_OSS;
	mxfp4.arch = MOE_ARCH_GPT_OSS;
	mxfp4.weight_dtype = mxfp4.shared_dtype = MOE_DTYPE_MXFP4;
	int4.weight_dtype = int4.shared_dtype = MOE_DTYPE_INT4;
	int4_shared.n_shared_experts = 1;
	int4_shared.shared_intermediate_size = 32;
	int4_shared.shared_dtype = MOE_DTYPE_INT4;
	ck_assert_int_eq(moe_backend_open("cpu", &o, &cpu, &err), 0);

	unsetenv("MOE_BACKEND_SELFTEST_FAULT");
	ck_assert_msg(moe_backend_selftest(cpu, &err) == 0, "clean self-test failed: %s", err.msg);

	setenv("MOE_BACKEND_SELFTEST_FAULT", "FP8", 1);
	ck_assert_msg(moe_backend_selftest_model(cpu, &bf16, &err) == 0, "bf16 model ran FP8 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &oss, &err) == 0, "gpt_oss model ran FP8 layers: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &fp8, &err), -EIO);
	ck_assert_msg(strstr(err.msg, "FP8"), "the failure names the layer: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &fp8_shared, &err), -EIO);
	ck_assert_int_eq(moe_backend_selftest(cpu, &err), -EIO);

	setenv("MOE_BACKEND_SELFTEST_FAULT", "gpt_oss", 1);
	ck_assert_msg(moe_backend_selftest_model(cpu, &bf16, &err) == 0, "bf16 model ran gpt_oss layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &fp8, &err) == 0, "FP8 model ran gpt_oss layers: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &oss, &err), -EIO);
	ck_assert_msg(strstr(err.msg, "gpt_oss"), "the failure names the layer: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &mxfp4, &err), -EIO);

	setenv("MOE_BACKEND_SELFTEST_FAULT", "MXFP4", 1);
	ck_assert_msg(moe_backend_selftest_model(cpu, &bf16, &err) == 0, "bf16 model ran MXFP4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &oss, &err) == 0, "bf16 gpt_oss ran MXFP4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &fp8, &err) == 0, "FP8 model ran MXFP4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &int4, &err) == 0, "int4 model ran MXFP4 layers: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &mxfp4, &err), -EIO);
	ck_assert_msg(strstr(err.msg, "MXFP4"), "the failure names the layer: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest(cpu, &err), -EIO);

	setenv("MOE_BACKEND_SELFTEST_FAULT", "int4", 1);
	ck_assert_msg(moe_backend_selftest_model(cpu, &bf16, &err) == 0, "bf16 model ran int4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &oss, &err) == 0, "gpt_oss ran int4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &fp8, &err) == 0, "FP8 model ran int4 layers: %s", err.msg);
	ck_assert_msg(moe_backend_selftest_model(cpu, &mxfp4, &err) == 0, "MXFP4 model ran int4 layers: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &int4, &err), -EIO);
	ck_assert_msg(strstr(err.msg, "int4"), "the failure names the layer: %s", err.msg);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &int4_shared, &err), -EIO);
	ck_assert_int_eq(moe_backend_selftest(cpu, &err), -EIO);

	setenv("MOE_BACKEND_SELFTEST_FAULT", "1", 1);
	ck_assert_int_eq(moe_backend_selftest_model(cpu, &bf16, &err), -EIO);
	unsetenv("MOE_BACKEND_SELFTEST_FAULT");
	moe_backend_close(cpu);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("backend module");
	TCase *tc = tcase_create("abi");

	tcase_add_test(tc, refuses_module_of_another_version);
	tcase_add_test(tc, refuses_module_of_another_ops_size);
	tcase_add_test(tc, refuses_module_without_version);
	tcase_add_test(tc, cuda_module_refuses_unknown_dtypes_before_the_device);
	tcase_add_test(tc, cuda_module_accepts_fp8_and_gpt_oss);
	tcase_add_test(tc, selftest_runs_the_layers_the_model_needs);
	suite_add_tcase(s, tc);
	return moe_test_run_suite(s, "check-module");
}
