/* SPDX-License-Identifier: MIT */
/*
 * The nearest of @n @names to @word, a command or option a person typed
 * wrong: the one name that @word (two letters or more) begins, else the
 * nearest by edit distance (a swap of neighbours counts one) when it is
 * one edit away for words under six letters, two for longer ones; NULL
 * when none is that close.
 */
#ifndef MOE_SUGGEST_H
#define MOE_SUGGEST_H

#include <stddef.h>

const char *moe_suggest(const char *word, const char *const *names, size_t n);

#endif
