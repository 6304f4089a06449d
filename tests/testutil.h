/* SPDX-License-Identifier: MIT */
/*
 * Helpers shared by the Check suites.
 */
#ifndef MOE_TESTUTIL_H
#define MOE_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "formats/genmodel.h"

/* A fresh directory under $TMPDIR (or /tmp), removed at exit.  Returns a
 * malloc'ed path; aborts the test on failure.  A test that fails leaves
 * through _exit() in Check's fork mode and skips that clean-up:
 * moe_test_run_suite() removes what it leaves. */
char *moe_test_tmpdir(const char *tag);

/*
 * Run the suite @s (CK_NORMAL; CK_FORK as Check reads it) inside a
 * directory $TMPDIR/moe-@tag-XXXXXX that $TMPDIR points at meanwhile, so
 * that every moe_test_tmpdir() of its tests is inside it, and remove that
 * directory afterwards: a failed test's files go too.  MOE_TEST_KEEP keeps
 * it (and says where).  Takes @s; EXIT_SUCCESS if no test failed, else
 * EXIT_FAILURE.
 */
struct Suite;
int moe_test_run_suite(struct Suite *s, const char *tag);

/* Remove a directory tree. */
void moe_test_rm_rf(const char *path);

/* Run a shell command built from a printf format; returns its exit status
 * (or -1 if it died from a signal: a crash is never a pass).  stdout and
 * stderr go to @out_path when it is not NULL. */
int moe_test_sh(const char *out_path, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "@dir/@name", malloc'ed; aborts the test when out of memory. */
char *moe_test_path_join(const char *dir, const char *name);

/* The struct moe_err *@err says @needle somewhere in its message. */
#define moe_test_assert_err_has(err, needle) \
	ck_assert_msg(strstr((err)->msg, (needle)) != NULL, "message '%s' lacks '%s'", (err)->msg, (needle))

/* Does @path exist? */
bool moe_test_exists(const char *path);

/* @n bytes (at least 1) aligned to a page, as the store's reads want them;
 * free() them.  Aborts the test when out of memory. */
void *moe_test_page_alloc(uint64_t n);

/* Read a whole file into a NUL-terminated malloc'ed buffer (NULL on error). */
char *moe_test_slurp(const char *path, uint64_t *ret_len);

/* The moectl binary under test ($MOECTL, else ../client/moectl). */
const char *moe_test_moectl(void);

/* Deterministic pseudo-random numbers (splitmix64) for test data. */
uint64_t moe_test_rand(uint64_t *state);
/* Uniform in [-1, 1). */
double moe_test_randf(uint64_t *state);

/* moe_gen_defaults(@arch) with @dtype and what the suites' small models
 * share: 4 attention heads over 2 KV heads, a vocabulary of 64, one shard. */
void moe_test_gen_small(enum moe_arch arch, enum moe_dtype dtype, struct moe_gen_options *ret_opt);

/* The deepseek_v3 routing of check_pager, check_daemon_*, check_invariance: 4
 * groups with the top 2 of them, one shared expert, scaling 2.5, normalised
 * top-k weights, layer 0 dense with intermediate size 64. */
void moe_test_gen_grouped(struct moe_gen_options *opt);

/* A small model of a test's own: its checkpoint and its store. */
struct moe_test_model {
	char *dir;                   /* a moe_test_tmpdir(); moed's config, socket and log go here too */
	char store[4096];            /* dir/model.moe */
	uint32_t H, k, E;            /* hidden size, top-k, routed experts */
	uint32_t nl;                 /* MoE layers */
	uint32_t layers[8];          /* their checkpoint numbers */
};

/* Generate @o's checkpoint in a fresh moe_test_tmpdir(@tag) and return
 * that directory; a failure fails the test. */
char *moe_test_gen(struct moe_gen_options *o, const char *tag);

struct moe_store;
/* Pack @dir into @dir/model.moe (@dtype: a pack --dtype, -1 for as stored)
 * and open it in *@ret; returns the store's path (free it); a failure fails
 * the test. */
char *moe_test_pack_to(const char *dir, int dtype, struct moe_store **ret);

/*
 * Make @m in a fresh moe_test_tmpdir(@tag): generate @opt's checkpoint in
 * its subdirectory @hf_sub (the directory itself when @hf_sub is NULL),
 * pack it, dtype as stored, into dir/model.moe, and list the store's MoE
 * layers.  0, or a negative errno with what failed in @why (then @m holds
 * only the directory, for moe_test_model_free()).  Asserts nothing, so
 * that fuzz_proto, which runs without Check, makes its model the same way.
 */
int moe_test_model_make(struct moe_test_model *m, const char *tag, const struct moe_gen_options *opt,
			const char *hf_sub, char *why, size_t why_len);

/* Remove @m's directory; a model freed already, or never made, is fine. */
void moe_test_model_free(struct moe_test_model *m);

/*
 * Overwrite the deepseek_v3 correction bias of @layer (F32 [16] in the
 * checkpoint in @dir) so that groups 0 and 1 win through one strongly
 * biased expert each while their other experts have negative biased
 * scores: with 4 experts per token from 2 kept groups, two must have a
 * negative score, where Hugging Face's 0.0 masking of dropped groups would
 * pick experts of groups 2 and 3 instead.  For 16 experts in 4 groups of 4.
 * 0, or -1 with the reason in @why.
 */
int moe_test_plant_negative_bias(const char *dir, uint32_t layer, char *why, size_t why_len);

/*
 * The FP8 checkpoint (gen-model quant_fp8, one model.safetensors) in @dir
 * with the shared experts' (@shared) or the routed experts' matrices taken
 * from the bf16 checkpoint of the same options in @bf16_dir, their scales
 * dropped: a release that quantized one kind of expert only.  0, or -1
 * with the reason in @why.
 */
int moe_test_mix_checkpoint(const char *dir, const char *bf16_dir, bool shared, char *why, size_t why_len);

/*
 * How many times slower than a plain build the code under test runs, for
 * the tests' time limits to scale by: 10 in a ThreadSanitizer build (it
 * costs 5-15x; moed and the tests are built alike), 1 otherwise;
 * $MOE_TEST_SLOW, a whole number, overrides.
 */
unsigned moe_test_slow(void);

#endif
