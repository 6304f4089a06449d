/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: .npy arrays (formats/npy.c), what `moectl forward
 * --input` reads.  The input is the whole file, read with moe_npy_read().
 * A refused file must come with a message naming it; an accepted one must
 * hold exactly its shape's elements (count is the product of the shape,
 * and the data is the rest of the file).
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/err.h"
#include "formats/npy.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_npy a = { 0 };
	struct moe_err err = { 0 };
	uint64_t count = 1, bytes;
	char path[32];
	int fd, r;

	fd = fuzz_file(data, size, path, sizeof(path));
	r = moe_npy_read(path, &a, &err);
	close(fd);
	if (r < 0) {
		if (!strstr(err.msg, path)) {
			fprintf(stderr, "fuzz_npy: error %d with the message '%s', which does not name the file\n",
				r, err.msg);
			abort();
		}
		return 0;
	}
	for (uint32_t i = 0; i < a.ndim; i++)
		count *= a.shape[i];
	bytes = count * moe_npy_type_size(a.type);
	if (a.ndim > MOE_NPY_MAX_DIMS || count != a.count || bytes > size ||
	    (bytes && memcmp(a.data, data + size - bytes, bytes))) {
		fprintf(stderr, "fuzz_npy: accepted %u dims, count %llu (shape gives %llu), %llu data bytes "
			"of a %zu-byte file, or data that is not the file's tail\n", a.ndim,
			(unsigned long long)a.count, (unsigned long long)count, (unsigned long long)bytes, size);
		abort();
	}
	moe_npy_free(&a);
	return 0;
}
