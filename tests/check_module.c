/* SPDX-License-Identifier: MIT */
/*
 * Backend modules carry the ABI they were built for
 * (MOE_BACKEND_ABI_VERSION and the size of the ops table): a module of
 * another version, another ops size or none (fake_module.c, whose ops
 * abort if called) is refused when it is opened, with a message that
 * names the module and both versions, and "auto" falls back to the CPU
 * and gives that message as its reason.
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
 * refuses a model with FP8 or int4 experts, or such a shared expert, by its
 * supports entry, before it looks for a device (so this runs without a
 * GPU): "cuda" fails saying why, "auto" serves it on the CPU saying why. */
START_TEST(cuda_module_refuses_fp8_experts_before_the_device)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	struct moe_model_config cfg = {
		.arch = MOE_ARCH_DEEPSEEK_V3, .hidden_size = 256, .moe_intermediate_size = 128,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.n_shared_experts = 1, .shared_intermediate_size = 128,
		.scoring = MOE_SCORING_SIGMOID, .topk_method = MOE_TOPK_NOAUX_TC, .has_bias = true,
		.gated = true, .act = MOE_ACT_SILU, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_FP8_E4M3_B128, .shared_dtype = MOE_DTYPE_FP8_E4M3_B128,
	};
	struct moe_backend_options o = { .threads = 1, .model = &cfg };
	char path[PATH_MAX];

	snprintf(path, sizeof(path), "%s/moe-backend-cuda.so", dir ? dir : "");
	if (!dir || access(path, R_OK) != 0) {
		printf("no CUDA module at %s: its FP8 refusal is not tested\n", path);
		return;
	}
	/* FP8, then int4 (GPTQ-like: groups of 64 with zero points) */
	for (int q = 0; q < 4; q++) {
		enum moe_dtype dt = q < 2 ? MOE_DTYPE_FP8_E4M3_B128 : MOE_DTYPE_INT4;
		const char *why = q < 2 ? "no kernels for FP8" : "no kernels for int4";
		struct moe_backend *be = NULL;
		struct moe_err err = { 0 };
		int r;

		cfg.shared_dtype = dt;
		cfg.weight_dtype = q % 2 ? MOE_DTYPE_BF16 : dt;      /* odd: the shared expert only */
		cfg.q4_group = dt == MOE_DTYPE_INT4 ? 64 : 0;
		cfg.q4_flags = dt == MOE_DTYPE_INT4 ? MOE_Q4_ZEROS : 0;
		r = moe_backend_open("cuda", &o, &be, &err);
		ck_assert_msg(r == -ENOTSUP, "cuda on %s gave %d (%s), not -ENOTSUP", moe_dtype_name(dt), r,
			      err.msg);
		ck_assert_ptr_null(be);
		ck_assert_msg(strstr(err.msg, why), "the reason: %s", err.msg);
		r = moe_backend_open("auto", &o, &be, &err);
		ck_assert_msg(r == 0, "auto did not open: %d %s", r, err.msg);
		ck_assert_str_eq(be->ops->name, "cpu");
		ck_assert_msg(strstr(be->reason, why), "the fallback reason: %s", be->reason);
		moe_backend_close(be);
	}
}
END_TEST

/* Likewise gpt_oss (expert biases and the clamped SwiGLU, which its kernels
 * do not compute): refused by supports, before any device is looked for. */
START_TEST(cuda_module_refuses_gpt_oss_before_the_device)
{
	const char *dir = getenv("MOE_BACKEND_DIR");
	struct moe_model_config cfg = {
		.arch = MOE_ARCH_GPT_OSS, .hidden_size = 64, .moe_intermediate_size = 16,
		.num_experts = 8, .top_k = 2, .num_hidden_layers = 1, .n_group = 1, .topk_group = 1,
		.scoring = MOE_SCORING_SOFTMAX, .topk_method = MOE_TOPK_GREEDY, .has_bias = true,
		.gated = true, .has_expert_bias = true, .act = MOE_ACT_SWIGLU_OAI,
		.swiglu_alpha = 1.702f, .swiglu_limit = 7.0f, .routed_scaling_factor = 1.0f,
		.weight_dtype = MOE_DTYPE_BF16, .shared_dtype = MOE_DTYPE_BF16,
	};
	struct moe_backend_options o = { .threads = 1, .model = &cfg };
	struct moe_backend *be = NULL;
	struct moe_err err = { 0 };
	char path[PATH_MAX];
	int r;

	snprintf(path, sizeof(path), "%s/moe-backend-cuda.so", dir ? dir : "");
	if (!dir || access(path, R_OK) != 0) {
		printf("no CUDA module at %s: its gpt_oss refusal is not tested\n", path);
		return;
	}
	r = moe_backend_open("cuda", &o, &be, &err);
	ck_assert_msg(r == -ENOTSUP, "cuda on gpt_oss gave %d (%s), not -ENOTSUP", r, err.msg);
	ck_assert_ptr_null(be);
	ck_assert_msg(strstr(err.msg, "does not compute gpt_oss experts"), "the reason: %s", err.msg);
	r = moe_backend_open("auto", &o, &be, &err);
	ck_assert_msg(r == 0, "auto did not open: %d %s", r, err.msg);
	ck_assert_str_eq(be->ops->name, "cpu");
	ck_assert_msg(strstr(be->reason, "does not compute gpt_oss experts"), "the fallback reason: %s",
		      be->reason);
	moe_backend_close(be);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("backend module");
	TCase *tc = tcase_create("abi");

	tcase_add_test(tc, refuses_module_of_another_version);
	tcase_add_test(tc, refuses_module_of_another_ops_size);
	tcase_add_test(tc, refuses_module_without_version);
	tcase_add_test(tc, cuda_module_refuses_fp8_experts_before_the_device);
	tcase_add_test(tc, cuda_module_refuses_gpt_oss_before_the_device);
	suite_add_tcase(s, tc);
	return moe_test_run_suite(s, "check-module");
}
