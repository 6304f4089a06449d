/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: a whole Hugging Face checkpoint as `moectl pack`
 * opens it (formats/hfmodel.c moe_hf_model_open: config.json, the
 * safetensors index and shards, then every tensor each MoE layer needs,
 * located and checked, int4 included).  The other harnesses take one file
 * each; this one is the checks between them: shapes against the config,
 * tensors in the shard the index names, scales beside their codes.
 *
 * The input is up to four parts separated by SEP: config.json, then
 * model.safetensors; with a third part, that part is
 * model.safetensors.index.json and the second and fourth are its shards
 * model-00001-of-00002.safetensors and model-00002-of-00002.safetensors.
 * They are written to a scratch directory (a checkpoint is a directory:
 * this parser has no entry point that takes memory).  A refusal must come
 * with a message; an accepted checkpoint's every expert and bias slice
 * must lie inside its tensor, as pack reads exactly those bytes.
 */
#include "config.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/err.h"
#include "formats/hfmodel.h"
#include "fuzz.h"

#define SEP "\n@@moe-fuzz@@\n"

static char dir[] = "/tmp/moe-fuzz-ckpt-XXXXXX";

static const char *const names[2][4] = {
	{ "config.json", "model.safetensors", NULL, NULL },
	{ "config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
	  "model-00002-of-00002.safetensors" },
};

static void put(const char *name, const uint8_t *d, size_t n)
{
	char path[sizeof(dir) + 64];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "we");
	if (!f || (n && fwrite(d, 1, n, f) != n) || fclose(f)) {
		perror(path);
		abort();
	}
}

static void clear(void)
{
	char path[sizeof(dir) + 64];

	for (int s = 0; s < 2; s++)
		for (int i = 0; i < 4; i++) {
			if (!names[s][i])
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, names[s][i]);
			unlink(path);
		}
}

static void cleanup(void)
{
	clear();
	rmdir(dir);
}

static void check_slice(const struct moe_hf_slice *sl, uint32_t li, uint32_t expert, int part)
{
	if (!sl->t || sl->offset > sl->t->nbytes || sl->nbytes > sl->t->nbytes - sl->offset) {
		fprintf(stderr, "fuzz_checkpoint: layer index %u expert %u part %d: slice [%llu, +%llu) "
			"is not inside tensor '%s' (%llu bytes)\n", li, expert, part,
			(unsigned long long)sl->offset, (unsigned long long)sl->nbytes,
			sl->t ? sl->t->name : "(none)", sl->t ? (unsigned long long)sl->t->nbytes : 0ULL);
		abort();
	}
}

static void check(const struct moe_hf_model *m)
{
	struct moe_hf_slice sl;

	for (uint32_t li = 0; li < m->hc->n_moe_layers; li++) {
		for (uint32_t e = 0; e <= m->cfg.num_experts; e++) {
			uint32_t ex = e == m->cfg.num_experts ? UINT32_MAX : e;   /* then the shared one */

			for (int p = MOE_HF_GATE; p <= MOE_HF_DOWN; p++)
				if (moe_hf_expert_slice(m, li, ex, (enum moe_hf_part)p, &sl) == 0)
					check_slice(&sl, li, ex, p);
			if (ex == UINT32_MAX)
				continue;
			for (int down = 0; down < 2; down++)
				if (moe_hf_expert_bias_slice(m, li, ex, down, &sl) == 0)
					check_slice(&sl, li, ex, 10 + down);
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int ready;
	const uint8_t *part[4] = { 0 }, *p = data, *end = data + size;
	size_t len[4] = { 0 }, n = 0;
	struct moe_hf_model *m = NULL;
	struct moe_err err = { 0 };
	int r, sharded;

	if (!ready) {
		if (!mkdtemp(dir)) {
			perror("fuzz_checkpoint: mkdtemp");
			abort();
		}
		atexit(cleanup);
		ready = 1;
	}
	while (n < 4) {
		const uint8_t *s = memmem(p, (size_t)(end - p), SEP, strlen(SEP));

		part[n] = p;
		len[n] = (size_t)((s ? s : end) - p);
		n++;
		if (!s)
			break;
		p = s + strlen(SEP);
	}
	if (n == 4)   /* the rest of the input belongs to the last part */
		len[3] = (size_t)(end - part[3]);
	sharded = n >= 3;
	clear();
	for (size_t i = 0; i < n; i++)
		put(names[sharded][i], part[i], len[i]);
	r = moe_hf_model_open(dir, &m, &err);
	if (r < 0) {
		if (!err.msg[0]) {
			fprintf(stderr, "fuzz_checkpoint: error %d without a message\n", r);
			abort();
		}
		return 0;
	}
	check(m);
	moe_hf_model_close(m);
	return 0;
}
