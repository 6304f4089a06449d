/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: the .moe store reader (engine/store.c), the one
 * parser moed runs on a file at start and on SIGHUP.  The input is the
 * whole store file; moe_store_open() must refuse it with a message that
 * names the file, or accept it, and then every read the pager and
 * `moectl verify` make (routers, shared experts, experts, the full
 * checksum pass) must stay inside the file and fail cleanly on a bad
 * checksum.
 *
 * Checksums would stop nearly every mutant at the door, so a zero field
 * means "fill in the right value" before the file is handed over:
 * file_size 0 becomes the input's length, a zero table checksum the
 * table's XXH3 (where the table lies inside the input), and a zero
 * header_checksum the header's.  A mutant that sets them to anything else
 * still tests the mismatch paths.  The seeds are stores moectl pack made.
 */
#include "config.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/err.h"
#include "engine/model.h"
#include "engine/store.h"
#include "fuzz.h"

/* XXH3 of the table of @count @elem-byte entries at @off, or 0 when it is
 * not inside the input (then the reader refuses it anyway). */
static uint64_t table_sum(const uint8_t *d, size_t size, uint64_t off, uint64_t count, uint64_t elem)
{
	if (off > size || elem == 0 || count > (size - off) / elem)
		return 0;
	return moe_store_checksum(d + off, count * elem);
}

static void fix_up(uint8_t *d, size_t size)
{
	struct moe_store_header h;

	if (size < sizeof(h))
		return;
	memcpy(&h, d, sizeof(h));
	if (h.file_size == 0)
		h.file_size = size;
	if (h.layer_table_checksum == 0)
		h.layer_table_checksum = table_sum(d, size, h.layer_table_offset, h.num_moe_layers,
						   sizeof(struct moe_store_layer));
	if (h.expert_sums_checksum == 0)
		h.expert_sums_checksum = table_sum(d, size, h.expert_sums_offset,
						   (uint64_t)h.num_moe_layers * h.num_experts, sizeof(uint64_t));
	if (h.header_checksum == 0)
		h.header_checksum = moe_store_header_checksum(&h);
	memcpy(d, &h, sizeof(h));
}

static void check_err(int r, const struct moe_err *err, const char *path, const char *what)
{
	if (r < 0 && (!err->msg[0] || !strstr(err->msg, path))) {
		fprintf(stderr, "fuzz_store: %s returned %d with the message '%s', which does not name %s\n",
			what, r, err->msg, path);
		abort();
	}
}

/* Every read a user of an open store makes; each either succeeds or fails
 * with a message, and none may touch memory outside its buffer. */
static void read_all(const struct moe_store *s, const char *path)
{
	const struct moe_model_config *c = &s->cfg;
	uint64_t shared = moe_shared_bytes(c);
	float *router, *bias, *gate;
	struct moe_err err;
	void *buf;
	int r;

	/* sizes the open checked against the file, so bounded by the input
	 * (+ 1: malloc(0) may return NULL) */
	router = malloc((size_t)c->num_experts * c->hidden_size * sizeof(float) + 1);
	bias = malloc((size_t)c->num_experts * sizeof(float) + 1);
	gate = malloc((size_t)c->hidden_size * sizeof(float) + 1);
	buf = malloc(s->hdr.expert_bytes > shared ? s->hdr.expert_bytes : shared ? shared : 1);
	if (!router || !bias || !gate || !buf)
		abort();
	for (uint32_t li = 0; li < s->hdr.num_moe_layers; li++) {
		memset(&err, 0, sizeof(err));
		r = moe_store_read_router(s, li, router, c->has_bias ? bias : NULL,
					  c->shared_gate ? gate : NULL, &err);
		check_err(r, &err, path, "moe_store_read_router");
		if (shared) {
			memset(&err, 0, sizeof(err));
			r = moe_store_read_shared(s, li, buf, &err);
			check_err(r, &err, path, "moe_store_read_shared");
		}
		for (uint32_t j = 0; j < c->num_experts; j++) {
			memset(&err, 0, sizeof(err));
			r = moe_store_read_expert(s, li, j, buf, &err);
			check_err(r, &err, path, "moe_store_read_expert");
		}
		if (moe_store_layer_index(s, s->layers[li].layer) != (int)li) {
			fprintf(stderr, "fuzz_store: layer %u is not found at its own index %u\n",
				s->layers[li].layer, li);
			abort();
		}
	}
	memset(&err, 0, sizeof(err));
	r = moe_store_verify(s, NULL, NULL, NULL, &err);
	check_err(r, &err, path, "moe_store_verify");
	free(router);
	free(bias);
	free(gate);
	free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_store *s = NULL;
	struct moe_err err = { 0 };
	char path[32];
	uint8_t *d;
	int fd, r;

	d = malloc(size ? size : 1);
	if (!d)
		abort();
	memcpy(d, data, size);
	fix_up(d, size);
	fd = fuzz_file(d, size, path, sizeof(path));
	free(d);
	r = moe_store_open(path, &s, &err);
	check_err(r, &err, path, "moe_store_open");
	if (r == 0) {
		read_all(s, path);
		moe_store_close(s);
	}
	close(fd);
	return 0;
}
