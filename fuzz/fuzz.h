/* SPDX-License-Identifier: MIT */
/*
 * What the libFuzzer harnesses share (fuzz/README is the overview; the
 * harnesses are built with clang -fsanitize=fuzzer, see Makefile.am).
 *
 * Most of moed's parsers take a path, as moed and moectl use them, and
 * none has a from-buffer entry point that skips the file handling, so a
 * harness hands its input over as a file: an anonymous memfd, named by its
 * /proc/self/fd path.  No disk writes per input, nothing left behind after
 * a crash, and the parser still runs its open/fstat/pread path.
 */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/io.h"

/* The entry point libFuzzer calls; declared here for -Wmissing-prototypes. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Put @size bytes of @data in a new memfd and its /proc/self/fd path in
 * @path (at least 32 bytes).  Returns the fd, for the caller to close after
 * the parser is done.  A failure here is the harness's, not the parser's:
 * abort, so that libFuzzer stops and says so.
 */
static inline int fuzz_file(const uint8_t *data, size_t size, char *path, size_t path_len)
{
	int fd = memfd_create("fuzz", MFD_CLOEXEC);

	if (fd < 0 || moe_pwrite_full(fd, data, size, 0) < 0) {
		perror("fuzz: memfd");
		abort();
	}
	snprintf(path, path_len, "/proc/self/fd/%d", fd);
	return fd;
}

#endif
