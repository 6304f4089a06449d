/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer harness: a Hugging Face config.json (formats/hfconfig.c), what
 * `moectl pack` and `moectl fingerprint` read first from a checkpoint that
 * may come from anywhere.  The input is the file's text, through
 * moe_hf_config_parse() (moe_hf_config_load() reads the file and calls it).
 * A refused input must come with a message naming the file; an accepted one
 * must describe a model the engine can size: MoE layers increasing and
 * below num_hidden_layers, and the expert sizes computable.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "engine/model.h"
#include "formats/hfmodel.h"
#include "fuzz.h"

#define NAME "fuzz/config.json"

static void check(const struct moe_hf_config *hc)
{
	for (uint32_t i = 0; i < hc->n_moe_layers; i++) {
		if (hc->moe_layers[i] >= hc->cfg.num_hidden_layers ||
		    (i > 0 && hc->moe_layers[i] <= hc->moe_layers[i - 1])) {
			fprintf(stderr, "fuzz_hfconfig: MoE layer %u (entry %u) is out of order or not below "
				"num_hidden_layers %u\n", hc->moe_layers[i], i, hc->cfg.num_hidden_layers);
			abort();
		}
	}
	/* the sizes pack and the store writer derive from it: computed, not checked here */
	(void)moe_expert_bytes(&hc->cfg);
	(void)moe_shared_bytes(&hc->cfg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct moe_hf_config *hc = NULL;
	struct moe_err err = { 0 };
	char *text;
	int r;

	/* config.json is text: the parser takes a C string */
	text = malloc(size + 1);
	if (!text)
		abort();
	memcpy(text, data, size);
	text[size] = '\0';
	r = moe_hf_config_parse(NAME, text, &hc, &err);
	free(text);
	if (r < 0) {
		if (!strstr(err.msg, NAME)) {
			fprintf(stderr, "fuzz_hfconfig: error %d with the message '%s', which does not name the file\n",
				r, err.msg);
			abort();
		}
		return 0;
	}
	check(hc);
	moe_hf_config_free(hc);
	return 0;
}
