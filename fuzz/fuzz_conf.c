/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: moed.conf (daemon/conf.c, moed.conf(5)), which moed
 * reads at start and again on every SIGHUP.  The input is the whole file,
 * loaded with moed_config_load().  A refused file must come with a message
 * naming it (or the file it @includes).  An accepted one must survive a
 * round trip: moed_config_dump()'s "name = value" lines, written back as a
 * moed.conf with their groups, load again to the same dump; a setting that
 * loads but does not write back, or writes back as something else, is a
 * bug that `moed --dump-config` users would hit.
 *
 * libconfig resolves @include relative to the working directory; libFuzzer
 * runs in a scratch directory (tests/fuzz_parsers.sh) and stdin is
 * /dev/null there, so an include names nothing of ours.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/conf.h"
#include "engine/err.h"
#include "fuzz.h"

/* The dump as a moed.conf: "a.b = v" lines become "a = { b = v; };". */
static char *dump_to_file(const char *dump)
{
	size_t cap = strlen(dump) * 2 + 64, n = 0, glen = 0;
	const char *group = NULL, *p = dump;
	char *out = malloc(cap);

	if (!out)
		abort();
	while (*p) {
		const char *eol = strchr(p, '\n'), *dot = strchr(p, '.'), *eq = strstr(p, " = ");

		if (!eol || !eq || eq > eol)
			abort();   /* the dump's own format */
		if (dot && dot > eq)
			dot = NULL;
		if (group && (!dot || (size_t)(dot - p) != glen || strncmp(p, group, glen))) {
			n += (size_t)snprintf(out + n, cap - n, "};\n");
			group = NULL;
		}
		if (dot && !group) {
			group = p;
			glen = (size_t)(dot - p);
			n += (size_t)snprintf(out + n, cap - n, "%.*s = {\n", (int)glen, p);
		}
		n += (size_t)snprintf(out + n, cap - n, "%.*s;\n", (int)(eol - (dot ? dot + 1 : p)),
				      dot ? dot + 1 : p);
		p = eol + 1;
	}
	if (group)
		n += (size_t)snprintf(out + n, cap - n, "};\n");
	if (n >= cap)
		abort();
	return out;
}

static void round_trip(const struct moed_config *c)
{
	struct moed_config *c2 = NULL;
	struct moe_err err = { 0 };
	char *dump, *file, *dump2, path[32];
	int fd;

	dump = moed_config_dump(c);
	if (!dump)
		abort();
	file = dump_to_file(dump);
	fd = fuzz_file((const uint8_t *)file, strlen(file), path, sizeof(path));
	if (moed_config_load(path, &c2, &err) < 0) {
		fprintf(stderr, "fuzz_conf: the dump of an accepted file does not load: %s\n--- dump\n%s",
			err.msg, dump);
		abort();
	}
	close(fd);
	dump2 = moed_config_dump(c2);
	if (!dump2 || strcmp(dump, dump2)) {
		fprintf(stderr, "fuzz_conf: the dump changes on reload\n--- first\n%s--- second\n%s",
			dump, dump2 ? dump2 : "(none)\n");
		abort();
	}
	free(dump2);
	free(file);
	free(dump);
	moed_config_free(c2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moed_config *c = NULL;
	struct moe_err err = { 0 };
	char path[32];
	int fd, r;

	fd = fuzz_file(data, size, path, sizeof(path));
	r = moed_config_load(path, &c, &err);
	close(fd);
	if (r < 0) {
		/* errors in an @include'd file name that file instead */
		if (!err.msg[0] || (!strstr(err.msg, path) && !memmem(data, size, "@include", 8))) {
			fprintf(stderr, "fuzz_conf: error %d with the message '%s', which does not name the file\n",
				r, err.msg);
			abort();
		}
		return 0;
	}
	round_trip(c);
	moed_config_free(c);
	return 0;
}
