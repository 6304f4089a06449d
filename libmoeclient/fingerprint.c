/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: checkpoint fingerprints (moe_checkpoint_fingerprint,
 * moe_client_fingerprint).  moectl pack records the fingerprint of the
 * directory it packs in the store's header; moed hands it to each client in
 * the WELCOME; a client that loads the rest of the model from a directory
 * compares the two.  Here rather than in formats/ because both the library
 * and moectl need it and the library must not depend on formats/.
 *
 * The definition (moe_checkpoint_fingerprint(3), moe-store(5)) is XXH3-128
 * over a stream built from the directory; every variable-length part comes
 * after its length, so that no two directories give the same stream:
 *
 *   "moed-fingerprint-1"                      18 bytes, the version
 *   u64 len, config.json's bytes
 *   for each regular file (after symlinks) named *.safetensors, not
 *   starting with '.', sorted bytewise by name:
 *     u64 len, the name
 *     u64 the file's size
 *     the 8-byte header length and the JSON header bytes, as in the file
 *     the data region after the header when it is at most 1 MiB; else 256
 *     samples of 4 KiB, sample i at floor(i * (D - 4096) / 255) of the
 *     region of D bytes (the first at its start, the last at its end)
 *
 * (u64 are little-endian.)  The result is the canonical (big-endian) form
 * of the hash, as xxhsum -H2 prints it.  The samples make it cheap, about
 * 1 MiB read per file whatever its size, and blind to a change that lies
 * only between samples: it identifies a checkpoint, it does not check it.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include "client_impl.h"

#define FP_TAG "moed-fingerprint-1"        /* the stream's first bytes: its version */
#define FP_SUFFIX ".safetensors"
#define FP_CONFIG_MAX (16u << 20)          /* config.json: a real one is under 100 KiB */
#define FP_HEADER_MAX (100u * 1000u * 1000u) /* safetensors' own limit on a header */
#define FP_SAMPLES 256u                    /* samples of a large data region ... */
#define FP_SAMPLE_BYTES 4096u              /* ... each this long: 1 MiB per file */
#define FP_CHUNK (64u << 10)               /* reads of a small region */

/* Read exactly @len bytes at @off; a file that ends early changed under us. */
static int pread_exact(int fd, void *buf, size_t len, uint64_t off)
{
	char *p = buf;

	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static void put_u64(XXH3_state_t *st, uint64_t v)
{
	unsigned char b[8];

	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
	XXH3_128bits_update(st, b, sizeof(b));
}

static int hash_config(XXH3_state_t *st, int dfd)
{
	struct stat sb;
	char *buf;
	int fd, r;

	/* O_NONBLOCK: a FIFO in its place must not hang us (then refused below) */
	fd = openat(dfd, "config.json", O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &sb) < 0) {
		r = -errno;
		goto out;
	}
	if (!S_ISREG(sb.st_mode)) {
		r = -EINVAL;
		goto out;
	}
	if ((uint64_t)sb.st_size > FP_CONFIG_MAX) {
		r = -EFBIG;
		goto out;
	}
	buf = malloc(sb.st_size ? (size_t)sb.st_size : 1);
	if (!buf) {
		r = -ENOMEM;
		goto out;
	}
	r = pread_exact(fd, buf, (size_t)sb.st_size, 0);
	if (r == 0) {
		put_u64(st, (uint64_t)sb.st_size);
		XXH3_128bits_update(st, buf, (size_t)sb.st_size);
	}
	free(buf);
out:
	close(fd);
	return r;
}

/* The data region [@base, @base + @len) of a file: all of it up to
 * FP_SAMPLES * FP_SAMPLE_BYTES, else FP_SAMPLES evenly spaced samples. */
static int hash_data(XXH3_state_t *st, int fd, uint64_t base, uint64_t len, unsigned char *buf)
{
	uint64_t span, q, rem;
	int r;

	if (len <= (uint64_t)FP_SAMPLES * FP_SAMPLE_BYTES) {
		for (uint64_t o = 0; o < len;) {
			size_t n = len - o < FP_CHUNK ? (size_t)(len - o) : FP_CHUNK;

			r = pread_exact(fd, buf, n, base + o);
			if (r < 0)
				return r;
			XXH3_128bits_update(st, buf, n);
			o += n;
		}
		return 0;
	}
	/* floor(i * span / (N - 1)) without the product overflowing */
	span = len - FP_SAMPLE_BYTES;
	q = span / (FP_SAMPLES - 1);
	rem = span % (FP_SAMPLES - 1);
	for (uint64_t i = 0; i < FP_SAMPLES; i++) {
		r = pread_exact(fd, buf, FP_SAMPLE_BYTES, base + i * q + i * rem / (FP_SAMPLES - 1));
		if (r < 0)
			return r;
		XXH3_128bits_update(st, buf, FP_SAMPLE_BYTES);
	}
	return 0;
}

static int hash_safetensors(XXH3_state_t *st, int dfd, const char *name, unsigned char *buf)
{
	unsigned char lenbuf[8];
	uint64_t size, hlen = 0;
	struct stat sb;
	char *hdr = NULL;
	int fd, r;

	fd = openat(dfd, name, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &sb) < 0) {
		r = -errno;
		goto out;
	}
	if (!S_ISREG(sb.st_mode)) {      /* replaced since it was listed */
		r = -EIO;
		goto out;
	}
	size = (uint64_t)sb.st_size;
	if (size < 8) {
		r = -EINVAL;
		goto out;
	}
	r = pread_exact(fd, lenbuf, 8, 0);
	if (r < 0)
		goto out;
	for (int i = 0; i < 8; i++)
		hlen |= (uint64_t)lenbuf[i] << (8 * i);
	if (hlen > FP_HEADER_MAX || hlen > size - 8) {
		r = -EINVAL;
		goto out;
	}
	hdr = malloc(hlen ? (size_t)hlen : 1);
	if (!hdr) {
		r = -ENOMEM;
		goto out;
	}
	r = pread_exact(fd, hdr, (size_t)hlen, 8);
	if (r < 0)
		goto out;
	put_u64(st, strlen(name));
	XXH3_128bits_update(st, name, strlen(name));
	put_u64(st, size);
	XXH3_128bits_update(st, lenbuf, 8);
	XXH3_128bits_update(st, hdr, (size_t)hlen);
	r = hash_data(st, fd, 8 + hlen, size - 8 - hlen, buf);
out:
	free(hdr);
	close(fd);
	return r;
}

static bool is_weights_file(const char *name)
{
	size_t n = strlen(name), s = strlen(FP_SUFFIX);

	/* as the shell's *.safetensors: no hidden files, something before the suffix */
	return n > s && name[0] != '.' && !strcmp(name + n - s, FP_SUFFIX);
}

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);   /* bytewise: unsigned char */
}

/* The *.safetensors regular files of @dfd, sorted, into *ret (NULL-free
 * array of *ret_n strdup'ed names). */
static int list_weights(int dfd, char ***ret, size_t *ret_n)
{
	char **names = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;
	DIR *d;
	int fd, r = 0;

	fd = dup(dfd);
	if (fd < 0)
		return -errno;
	d = fdopendir(fd);
	if (!d) {
		r = -errno;
		close(fd);
		return r;
	}
	for (;;) {
		struct stat sb;

		errno = 0;      /* readdir's NULL is an error only with errno set */
		de = readdir(d);
		if (!de) {
			r = -errno;
			break;
		}
		if (!is_weights_file(de->d_name))
			continue;
		/* regular files after symlinks: the Hugging Face cache links them */
		if (fstatat(dfd, de->d_name, &sb, 0) < 0 || !S_ISREG(sb.st_mode))
			continue;
		if (n == cap) {
			size_t nc = cap ? 2 * cap : 16;
			char **nn = realloc(names, nc * sizeof(*nn));

			if (!nn) {
				r = -ENOMEM;
				break;
			}
			names = nn;
			cap = nc;
		}
		if (!(names[n] = strdup(de->d_name))) {
			r = -ENOMEM;
			break;
		}
		n++;
	}
	closedir(d);
	if (r < 0) {
		while (n)
			free(names[--n]);
		free(names);
		return r;
	}
	if (n)
		qsort(names, n, sizeof(*names), cmp_names);
	*ret = names;
	*ret_n = n;
	return 0;
}

static void to_hex(const unsigned char raw[16], char out[MOE_FINGERPRINT_LEN])
{
	static const char digits[] = "0123456789abcdef";

	for (int i = 0; i < 16; i++) {
		out[2 * i] = digits[raw[i] >> 4];
		out[2 * i + 1] = digits[raw[i] & 15];
	}
	out[32] = '\0';
}

MOE_EXPORT int moe_checkpoint_fingerprint(const char *dir, char out[MOE_FINGERPRINT_LEN])
{
	XXH3_state_t *st = NULL;
	XXH128_canonical_t canon;
	unsigned char *buf = NULL;
	char **names = NULL;
	size_t n = 0;
	int dfd, r;

	if (!dir || !out)
		return -EINVAL;
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return -errno;
	st = XXH3_createState();
	buf = malloc(FP_CHUNK);
	if (!st || !buf) {
		r = -ENOMEM;
		goto out;
	}
	XXH3_128bits_reset(st);
	XXH3_128bits_update(st, FP_TAG, strlen(FP_TAG));
	r = hash_config(st, dfd);
	if (r < 0)
		goto out;
	r = list_weights(dfd, &names, &n);
	if (r < 0)
		goto out;
	if (n == 0) {
		r = -ENODATA;
		goto out;
	}
	for (size_t i = 0; i < n && r == 0; i++)
		r = hash_safetensors(st, dfd, names[i], buf);
	if (r < 0)
		goto out;
	XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(st));
	to_hex(canon.digest, out);
out:
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	free(buf);
	XXH3_freeState(st);
	close(dfd);
	return r;
}

MOE_EXPORT int moe_client_fingerprint(struct moe_client *c, char out[MOE_FINGERPRINT_LEN])
{
	static const unsigned char none[16];

	if (!c || !out)
		return -EINVAL;
	/* a daemon before fingerprints left these bytes zero, as does a store without one */
	if (!(c->w->features & MOE_FEAT_FINGERPRINT) || !memcmp(c->w->fingerprint, none, sizeof(none)))
		return -ENODATA;
	to_hex(c->w->fingerprint, out);
	return 0;
}
