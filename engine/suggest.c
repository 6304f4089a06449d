/* SPDX-License-Identifier: MIT */
/*
 * "Did you mean": the nearest of a list of names to a word a person typed,
 * for moectl's commands and options and moed's options.
 */
#include "config.h"

#include <string.h>

#include "suggest.h"

/* Edit distance of two short words, a swap of neighbours counting one
 * (optimal string alignment: "stast" for "stats", "hlep" for "help"),
 * capped at 9. */
static size_t distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b), d[33][33];

	if (la > 32 || lb > 32)
		return 9;
	for (size_t i = 0; i <= la; i++)
		d[i][0] = i;
	for (size_t j = 0; j <= lb; j++)
		d[0][j] = j;
	for (size_t i = 1; i <= la; i++) {
		for (size_t j = 1; j <= lb; j++) {
			size_t best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);

			if (d[i - 1][j] + 1 < best)
				best = d[i - 1][j] + 1;
			if (d[i][j - 1] + 1 < best)
				best = d[i][j - 1] + 1;
			if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < best)
				best = d[i - 2][j - 2] + 1;
			d[i][j] = best;
		}
	}
	return d[la][lb] < 9 ? d[la][lb] : 9;
}

const char *moe_suggest(const char *word, const char *const *names, size_t n)
{
	const char *best = NULL;
	size_t len = strlen(word), best_d = 9;

	/* a prefix of exactly one name ("stat" for "stats") wins outright */
	for (size_t i = 0; i < n; i++) {
		if (len >= 2 && !strncmp(names[i], word, len)) {
			if (best)
				return NULL;
			best = names[i];
		}
	}
	if (best)
		return best;
	for (size_t i = 0; i < n; i++) {
		size_t d = distance(word, names[i]);

		if (d < best_d) {
			best_d = d;
			best = names[i];
		}
	}
	/* one typo in a short word, two in a longer one */
	return best && best_d <= (len < 6 ? 1u : 2u) ? best : NULL;
}
