/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/err.h"
#include "formats/pack.h"
#include "engine/rng.h"
#include "formats/safetensors.h"
#include "engine/store.h"
#include "testutil.h"

static char *tmpdirs[64];
static int n_tmpdirs;

static void cleanup_tmpdirs(void)
{
	if (getenv("MOE_TEST_KEEP"))
		return;
	for (int i = 0; i < n_tmpdirs; i++) {
		moe_test_rm_rf(tmpdirs[i]);
		free(tmpdirs[i]);
	}
	n_tmpdirs = 0;
}

char *moe_test_tmpdir(const char *tag)
{
	const char *base = getenv("TMPDIR");
	char *path;

	if (!base || !*base)
		base = "/tmp";
	if (asprintf(&path, "%s/moe-%s-XXXXXX", base, tag) < 0)
		abort();
	if (!mkdtemp(path)) {
		fprintf(stderr, "mkdtemp %s: %s\n", path, strerror(errno));
		abort();
	}
	if (n_tmpdirs == 0)
		atexit(cleanup_tmpdirs);
	if (n_tmpdirs < 64)
		tmpdirs[n_tmpdirs++] = strdup(path);
	return path;
}

static char *run_dir;            /* moe_test_run_suite()'s, while it runs */
static char *run_dir_outer;      /* $TMPDIR before it */

/*
 * Check forks every test, and a test that fails leaves with _exit(): its
 * atexit clean-up never runs.  So the runner makes one directory for the
 * run, every test's moe_test_tmpdir() lands inside it through $TMPDIR, and
 * the runner, which always gets to the end, removes it.  Mode 0711: others
 * may pass through to a socket (check_daemon_sessions' uid test) but not list it.
 */
static void run_dir_make(const char *tag)
{
	const char *base = getenv("TMPDIR");

	if (!base || !*base)
		base = "/tmp";
	run_dir_outer = getenv("TMPDIR") ? strdup(getenv("TMPDIR")) : NULL;
	if (asprintf(&run_dir, "%s/moe-%s-XXXXXX", base, tag) < 0 || !mkdtemp(run_dir)) {
		perror("moe test run directory");
		abort();
	}
	chmod(run_dir, 0711);
	setenv("TMPDIR", run_dir, 1);
}

static void run_dir_remove(void)
{
	if (getenv("MOE_TEST_KEEP"))
		fprintf(stderr, "kept %s\n", run_dir);
	else
		moe_test_rm_rf(run_dir);
	free(run_dir);
	run_dir = NULL;
	if (run_dir_outer)
		setenv("TMPDIR", run_dir_outer, 1);
	else
		unsetenv("TMPDIR");
	free(run_dir_outer);
	run_dir_outer = NULL;
}

int moe_test_run_suite(Suite *s, const char *tag)
{
	SRunner *sr = srunner_create(s);
	int failed;

	run_dir_make(tag);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	run_dir_remove();
	return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

void moe_test_rm_rf(const char *path)
{
	nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int moe_test_sh(const char *out_path, const char *fmt, ...)
{
	char *cmd, *full;
	va_list ap;
	int st;

	va_start(ap, fmt);
	if (vasprintf(&cmd, fmt, ap) < 0)
		abort();
	va_end(ap);
	if (out_path) {
		if (asprintf(&full, "(%s) >'%s' 2>&1", cmd, out_path) < 0)
			abort();
	} else {
		full = strdup(cmd);
	}
	st = system(full);
	free(cmd);
	free(full);
	if (st == -1 || !WIFEXITED(st))
		return -1;
	/* the shell reports a child killed by a signal as 128 + signal */
	if (WEXITSTATUS(st) > 128)
		return -1;
	return WEXITSTATUS(st);
}

char *moe_test_path_join(const char *dir, const char *name)
{
	char *p;

	ck_assert_int_ge(asprintf(&p, "%s/%s", dir, name), 0);
	return p;
}

bool moe_test_exists(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0;
}

void *moe_test_page_alloc(uint64_t n)
{
	void *p = NULL;

	ck_assert(posix_memalign(&p, 4096, n ? n : 1) == 0);
	return p;
}

char *moe_test_slurp(const char *path, uint64_t *ret_len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
		buf = malloc((size_t)n + 1);
		if (buf && fread(buf, 1, (size_t)n, f) == (size_t)n) {
			buf[n] = '\0';
			if (ret_len)
				*ret_len = (uint64_t)n;
		} else {
			free(buf);
			buf = NULL;
		}
	}
	fclose(f);
	return buf;
}

const char *moe_test_moectl(void)
{
	const char *p = getenv("MOECTL");

	return p && *p ? p : "../client/moectl";
}

uint64_t moe_test_rand(uint64_t *s)
{
	return moe_splitmix64(s);
}

double moe_test_randf(uint64_t *s)
{
	return (double)(moe_test_rand(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

void moe_test_gen_small(enum moe_arch arch, enum moe_dtype dtype, struct moe_gen_options *ret_opt)
{
	moe_gen_defaults(arch, ret_opt);
	ret_opt->arch = arch;
	ret_opt->dtype = dtype;
	ret_opt->vocab_size = 64;
	ret_opt->num_attention_heads = 4;
	ret_opt->num_key_value_heads = 2;
	ret_opt->shard_bytes = 0;
}

void moe_test_gen_grouped(struct moe_gen_options *opt)
{
	opt->n_group = 4;
	opt->topk_group = 2;
	opt->n_shared_experts = 1;
	opt->routed_scaling_factor = 2.5f;
	opt->norm_topk_prob = 1;
	opt->intermediate_size = 64;
	opt->first_k_dense_replace = 1;
}

/* Generate @opt's checkpoint in @dir/@hf_sub (@dir itself when @hf_sub is
 * NULL) and pack it into @dir/model.moe.  0 or a negative errno, with what
 * failed in @why. */
static int model_pack(const struct moe_gen_options *opt, const char *dir, const char *hf_sub, char *ret_store,
		      size_t store_len, char *why, size_t why_len)
{
	struct moe_pack_options popt = { .dtype = -1 };   /* as the checkpoint has it */
	struct moe_err err = { 0 };
	char hf[4096];
	int rc;

	if (hf_sub)
		snprintf(hf, sizeof(hf), "%s/%s", dir, hf_sub);
	else
		snprintf(hf, sizeof(hf), "%s", dir);
	rc = moe_gen_model(opt, hf, NULL, NULL, &err);
	if (rc < 0) {
		snprintf(why, why_len, "gen-model failed: %d %s", rc, err.msg);
		return rc;
	}
	snprintf(ret_store, store_len, "%s/model.moe", dir);
	rc = moe_pack(hf, ret_store, &popt, &err);
	if (rc < 0) {
		snprintf(why, why_len, "pack failed: %d %s", rc, err.msg);
		return rc;
	}
	return 0;
}

int moe_test_model_make(struct moe_test_model *m, const char *tag, const struct moe_gen_options *opt,
			const char *hf_sub, char *why, size_t why_len)
{
	struct moe_err err = { 0 };
	struct moe_store *s;
	int rc;

	memset(m, 0, sizeof(*m));
	m->H = opt->hidden_size;
	m->k = opt->top_k;
	m->E = opt->num_experts;
	m->dir = moe_test_tmpdir(tag);
	rc = model_pack(opt, m->dir, hf_sub, m->store, sizeof(m->store), why, why_len);
	if (rc < 0)
		return rc;
	rc = moe_store_open(m->store, &s, &err);
	if (rc < 0) {
		snprintf(why, why_len, "store open: %s", err.msg);
		return rc;
	}
	if (s->hdr.num_moe_layers > sizeof(m->layers) / sizeof(m->layers[0])) {
		snprintf(why, why_len, "%s: %u MoE layers, more than the %zu of struct moe_test_model", m->store,
			 s->hdr.num_moe_layers, sizeof(m->layers) / sizeof(m->layers[0]));
		moe_store_close(s);
		return -E2BIG;
	}
	m->nl = s->hdr.num_moe_layers;
	for (uint32_t i = 0; i < m->nl; i++)
		m->layers[i] = s->layers[i].layer;
	moe_store_close(s);
	return 0;
}

void moe_test_model_free(struct moe_test_model *m)
{
	if (!m->dir)
		return;
	moe_test_rm_rf(m->dir);
	free(m->dir);
	m->dir = NULL;
}

int moe_test_plant_negative_bias(const char *dir, uint32_t layer, char *why, size_t why_len)
{
	static const float bias[16] = {
		3.0f, -2.0f, -2.0f, -2.0f,   3.0f, -2.0f, -2.5f, -2.0f,
		-1.0f, -1.0f, -1.0f, -1.0f,  -1.0f, -1.0f, -1.0f, -1.0f,
	};
	struct moe_st_checkpoint *ck;
	const struct moe_st_tensor *t;
	struct moe_err err = { 0 };
	unsigned char le[sizeof(bias)];
	char name[128];
	int fd, rc = 0;

	if (moe_st_checkpoint_open(dir, &ck, &err) < 0) {
		snprintf(why, why_len, "%s: %s", dir, err.msg);
		return -1;
	}
	snprintf(name, sizeof(name), "model.layers.%u.mlp.gate.e_score_correction_bias", layer);
	t = moe_st_find(ck, name);
	if (!t || strcmp(t->st_dtype, "F32") || t->nbytes != sizeof(bias)) {
		snprintf(why, why_len, "%s: not an F32 [16] tensor in the checkpoint", name);
		moe_st_checkpoint_close(ck);
		return -1;
	}
	for (size_t i = 0; i < 16; i++) {
		uint32_t u;

		memcpy(&u, &bias[i], 4);
		for (int b = 0; b < 4; b++)
			le[4 * i + b] = (unsigned char)(u >> (8 * b));
	}
	fd = open(ck->files[t->file].path, O_WRONLY);
	if (fd < 0 || pwrite(fd, le, sizeof(le), (off_t)t->offset) != (ssize_t)sizeof(le)) {
		snprintf(why, why_len, "cannot write %s: %s", ck->files[t->file].path, strerror(errno));
		rc = -1;
	}
	if (fd >= 0)
		close(fd);
	moe_st_checkpoint_close(ck);
	return rc;
}

int moe_test_mix_checkpoint(const char *dir, const char *bf16_dir, bool shared, char *why, size_t why_len)
{
	const char *which = shared ? ".mlp.shared_experts." : ".mlp.experts.";
	struct moe_st_checkpoint *q = NULL, *h = NULL;
	struct moe_st_writer *w = NULL;
	struct moe_err err = { 0 };
	char path[4096], tmp[4096];
	const struct moe_st_tensor **src = NULL;
	size_t n = 0;
	void *buf = NULL;
	int rc = -1;

	if (moe_st_checkpoint_open(dir, &q, &err) < 0 || moe_st_checkpoint_open(bf16_dir, &h, &err) < 0)
		goto fail;
	src = calloc(q->n_tensors, sizeof(*src));
	if (!src) {
		snprintf(why, why_len, "out of memory");
		goto out;
	}
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	snprintf(tmp, sizeof(tmp), "%s/model.safetensors.mix", dir);
	if (moe_st_writer_new(tmp, &w, &err) < 0)
		goto fail;
	for (size_t i = 0; i < q->n_tensors; i++) {
		const struct moe_st_tensor *t = &q->tensors[i];
		bool swap = strstr(t->name, which) != NULL;

		if (swap && strstr(t->name, "_scale_inv"))
			continue;
		if (swap && !(t = moe_st_find(h, t->name))) {
			snprintf(why, why_len, "mix: %s is not in the bf16 checkpoint", q->tensors[i].name);
			goto out;
		}
		if (moe_st_writer_declare(w, t->name, !strcmp(t->st_dtype, "F8_E4M3") ? MOE_DTYPE_FP8_E4M3_B128
										     : (enum moe_dtype)t->dtype,
					  t->ndim, t->shape, &err) < 0)
			goto fail;
		src[n++] = t;
	}
	if (moe_st_writer_begin(w, &err) < 0)
		goto fail;
	for (size_t i = 0; i < n; i++) {
		bool from_h = strstr(src[i]->name, which) != NULL;

		free(buf);
		if (!(buf = malloc(src[i]->nbytes ? src[i]->nbytes : 1))) {
			snprintf(why, why_len, "out of memory");
			goto out;
		}
		if (moe_st_read(from_h ? h : q, src[i], 0, buf, src[i]->nbytes, &err) < 0 ||
		    moe_st_writer_write(w, buf, src[i]->nbytes, &err) < 0)
			goto fail;
	}
	rc = moe_st_writer_finish(w, &err);
	w = NULL;           /* freed either way */
	if (rc < 0)
		goto fail;
	rc = rename(tmp, path);
	if (rc < 0)
		snprintf(why, why_len, "mix: rename %s: %s", tmp, strerror(errno));
	goto out;
fail:
	rc = -1;
	snprintf(why, why_len, "mix: %s", err.msg);
out:
	moe_st_writer_abort(w);
	free(buf);
	free(src);
	moe_st_checkpoint_close(q);
	moe_st_checkpoint_close(h);
	return rc;
}

char *moe_test_gen(struct moe_gen_options *o, const char *tag)
{
	char *dir = moe_test_tmpdir(tag);
	struct moe_err err = { 0 };
	int r = moe_gen_model(o, dir, NULL, NULL, &err);

	ck_assert_msg(r == 0, "gen-model: %s", err.msg);
	return dir;
}

char *moe_test_pack_to(const char *dir, int dtype, struct moe_store **ret)
{
	struct moe_pack_options po = { .dtype = dtype };
	struct moe_err err = { 0 };
	char *out;
	int r;

	ck_assert(asprintf(&out, "%s/model.moe", dir) > 0);
	r = moe_pack(dir, out, &po, &err);
	ck_assert_msg(r == 0, "pack %s: %s", dir, err.msg);
	r = moe_store_open(out, ret, &err);
	ck_assert_msg(r == 0, "open %s: %s", out, err.msg);
	return out;
}

unsigned moe_test_slow(void)
{
	const char *e = getenv("MOE_TEST_SLOW");
	unsigned tsan = 0;

	if (e && atoi(e) > 0)
		return (unsigned)atoi(e);
#if defined(__SANITIZE_THREAD__)
	tsan = 1;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
	tsan = 1;
#endif
#endif
	return tsan ? 10 : 1;
}
