/* SPDX-License-Identifier: MIT */
#include "config.h"

#include <errno.h>
#include <unistd.h>

#include "io.h"

/* Largest piece per system call: Linux transfers at most ~2 GiB at once. */
#define IO_PIECE ((uint64_t)1 << 30)

int64_t moe_pread_full(int fd, void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	if (len > (uint64_t)INT64_MAX || off > (uint64_t)INT64_MAX - len)
		return -EOVERFLOW;
	while (done < len) {
		uint64_t want = len - done > IO_PIECE ? IO_PIECE : len - done;
		ssize_t n = pread(fd, (char *)buf + done, (size_t)want, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		done += (uint64_t)n;
	}
	return (int64_t)done;
}

int moe_pwrite_full(int fd, const void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	if (len > (uint64_t)INT64_MAX || off > (uint64_t)INT64_MAX - len)
		return -EOVERFLOW;
	while (done < len) {
		uint64_t want = len - done > IO_PIECE ? IO_PIECE : len - done;
		ssize_t n = pwrite(fd, (const char *)buf + done, (size_t)want, (off_t)(off + done));

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		done += (uint64_t)n;
	}
	return 0;
}
