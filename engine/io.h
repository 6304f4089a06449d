/* SPDX-License-Identifier: MIT */
/*
 * Positioned file I/O that finishes the job: resumes after EINTR and short
 * transfers, and splits transfers into pieces the kernel accepts.
 */
#ifndef MOE_IO_H
#define MOE_IO_H

#include <stdint.h>

/* Read @len bytes at @off.  Returns the bytes read, fewer than @len only at
 * end of file, or -errno (-EOVERFLOW for offsets past what off_t holds). */
int64_t moe_pread_full(int fd, void *buf, uint64_t len, uint64_t off);

/* Write all @len bytes at @off.  Returns 0 or -errno (-EIO if the file
 * takes no more). */
int moe_pwrite_full(int fd, const void *buf, uint64_t len, uint64_t off);

#endif
