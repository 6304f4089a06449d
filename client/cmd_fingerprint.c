/* SPDX-License-Identifier: MIT */
/*
 * moectl fingerprint, and the fingerprint helpers of pack, inspect and info:
 * which checkpoint a store was packed from (moe_checkpoint_fingerprint(3)).
 * The fingerprint itself is libmoeclient's; this file turns its errors into
 * messages that name the file at fault.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libmoeclient/moeclient.h"
#include "moectl.h"

#define ST_HEADER_MAX (100u * 1000u * 1000u)   /* as fingerprint.c: safetensors' own limit */

bool moectl_fingerprint_hex(const uint8_t raw[16], char out[MOE_FINGERPRINT_LEN])
{
	static const char digits[] = "0123456789abcdef";
	bool any = false;

	for (int i = 0; i < 16; i++) {
		out[2 * i] = digits[raw[i] >> 4];
		out[2 * i + 1] = digits[raw[i] & 15];
		any |= raw[i] != 0;
	}
	out[32] = '\0';
	return any;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* The *.safetensors file of @dir whose header moe_checkpoint_fingerprint
 * refused with -EINVAL (the library returns only the errno), into @buf. */
static bool find_bad_header(const char *dir, char *buf, size_t len)
{
	struct dirent *de;
	bool found = false;
	DIR *d = opendir(dir);

	if (!d)
		return false;
	while (!found && (de = readdir(d))) {
		size_t n = strlen(de->d_name);
		unsigned char lb[8];
		uint64_t hlen = 0;
		struct stat sb;
		char path[4096];
		int fd;

		if (n <= 12 || de->d_name[0] == '.' || strcmp(de->d_name + n - 12, ".safetensors"))
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode)) {
			if (sb.st_size < 8 || pread(fd, lb, 8, 0) != 8) {
				snprintf(buf, len, "%s: %lld bytes, too short for a safetensors header",
					 path, (long long)sb.st_size);
				found = true;
			} else {
				for (int i = 0; i < 8; i++)
					hlen |= (uint64_t)lb[i] << (8 * i);
				if (hlen > ST_HEADER_MAX || hlen > (uint64_t)sb.st_size - 8) {
					snprintf(buf, len, "%s: header length %llu lies past the file's %lld "
						 "bytes or over 100 MB (truncated or not a safetensors file)",
						 path, (unsigned long long)hlen, (long long)sb.st_size);
					found = true;
				}
			}
		}
		close(fd);
	}
	closedir(d);
	return found;
}

void moectl_fingerprint_why(const char *dir, int r, char *buf, size_t len)
{
	struct stat sb;

	switch (r) {
	case -ENOENT:
		if (stat(dir, &sb) < 0)
			snprintf(buf, len, "%s: no such directory", dir);
		else
			snprintf(buf, len, "%s/config.json: not found (a checkpoint directory holds "
				 "config.json and *.safetensors)", dir);
		break;
	case -ENODATA:
		snprintf(buf, len, "%s: no *.safetensors file: the fingerprint is defined over a "
			 "safetensors checkpoint only", dir);
		break;
	case -EFBIG:
		snprintf(buf, len, "%s/config.json: over 16 MiB, not a model's config.json", dir);
		break;
	case -EINVAL:
		if (!find_bad_header(dir, buf, len))
			snprintf(buf, len, "%s: config.json or a *.safetensors file is not a regular "
				 "file, or a header is malformed", dir);
		break;
	case -EIO:
		snprintf(buf, len, "%s: a file changed while it was read; try again once it is "
			 "complete", dir);
		break;
	default:
		snprintf(buf, len, "%s: %s", dir, moe_strerror(r));
		break;
	}
}

int moectl_fingerprint_raw(const char *dir, uint8_t raw[16])
{
	char hex[MOE_FINGERPRINT_LEN];
	int r = moe_checkpoint_fingerprint(dir, hex);

	if (r < 0)
		return r;
	for (int i = 0; i < 16; i++) {
		int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);

		if (hi < 0 || lo < 0)
			return -EPROTO;     /* not the library's format: a mismatched libmoeclient */
		raw[i] = (uint8_t)(hi << 4 | lo);
	}
	return 0;
}

static void fingerprint_usage(FILE *f)
{
	fputs("usage: moectl fingerprint HF_DIR\n"
	      "\n"
	      "Print the fingerprint of the Hugging Face checkpoint in HF_DIR, as moectl pack\n"
	      "records it in a store (moectl inspect shows it) and moed reports it to clients\n"
	      "(moectl info), so that the served model can be compared with a checkpoint by\n"
	      "hand.  It reads config.json and about 1 MiB of each *.safetensors file; see\n"
	      "moe_checkpoint_fingerprint(3) for what it covers.\n"
	      "\n"
	      "  -h, --help  show this help\n", f);
}

int cmd_fingerprint(int argc, char **argv)
{
	char hex[MOE_FINGERPRINT_LEN], why[8192];
	const char *dir = NULL;
	int r;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			fingerprint_usage(stdout);
			return 0;
		} else if (!strcmp(argv[i], "--") && i + 1 < argc && !dir) {
			dir = argv[++i];
		} else if (argv[i][0] == '-') {
			return moectl_unknown("fingerprint", "option", argv[i], (const char *const[]){ "help" }, 1);
		} else if (dir) {
			return moectl_usage("fingerprint", "unexpected argument '%s'", argv[i]);
		} else {
			dir = argv[i];
		}
	}
	if (!dir)
		return moectl_usage("fingerprint", "missing HF_DIR");
	r = moe_checkpoint_fingerprint(dir, hex);
	if (r < 0) {
		moectl_fingerprint_why(dir, r, why, sizeof(why));
		return moectl_fail("fingerprint: %s", why);
	}
	printf("%s\n", hex);
	return 0;
}
