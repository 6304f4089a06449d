/* SPDX-License-Identifier: MIT */
/*
 * moe_forward_example: run a batch of random tokens through one MoE layer
 * of the model moed serves, twice:
 *   1. synchronously with moe_client_forward(): the tensors are anywhere in
 *      memory and the library copies them through the shared arena;
 *   2. asynchronously with moe_client_alloc(), moe_client_submit() and
 *      moe_client_wait(): the tensors live in the arena, nothing is copied;
 * and print both, which must be the same bits.
 *
 *   cc -o moe_forward_example moe_forward_example.c $(pkg-config --cflags --libs moeclient)
 *   ./moe_forward_example [SOCKET]
 *
 * SOCKET defaults to $MOED_SOCKET, then /run/moed/moed.sock.  Exits 0 on
 * success, 1 with a message on any error.  Needs only <moeclient.h>.
 */
#include <moeclient.h>      /* first: the public header must compile on its own */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOKENS 4            /* tokens in the batch (fewer if moed allows fewer) */
#define SHOWN 4             /* output values printed per token */

static int fail(const char *what, int err)
{
	fprintf(stderr, "moe_forward_example: %s: %s\n", what, moe_strerror(err));
	return 1;
}

static void print_token(uint64_t t, const float *out, const int32_t *ids, const float *weights,
			const struct moe_model_info *info)
{
	printf("  token %llu: experts", (unsigned long long)t);
	for (uint32_t j = 0; j < info->top_k; j++)
		printf(" %d (%.3f)", ids[t * info->top_k + j], weights[t * info->top_k + j]);
	printf("; output");
	for (uint32_t i = 0; i < SHOWN && i < info->hidden_size; i++)
		printf(" %+.5f", out[t * info->hidden_size + i]);
	printf(" ...\n");
}

int main(int argc, char **argv)
{
	struct moe_client *c;
	struct moe_model_info info;
	struct moe_request req;
	struct moe_completion cqe;
	float *input = NULL, *output = NULL, *weights = NULL;
	int32_t *ids = NULL;
	void *a_in = NULL, *a_out = NULL, *a_ids = NULL, *a_weights = NULL;
	uint64_t tokens, t;
	size_t act_bytes, route_bytes;
	uint32_t layer;
	int r, status = 1;

	r = moe_client_connect(argc > 1 ? argv[1] : NULL, NULL, &c);
	if (r < 0) {
		/* the same choice as moe_client_connect() makes, to name it */
		const char *path = argc > 1 ? argv[1] : getenv("MOED_SOCKET");

		fprintf(stderr, "moe_forward_example: cannot connect to moed at %s: %s\n",
			path && *path ? path : "/run/moed/moed.sock", moe_strerror(r));
		fprintf(stderr, "moe_forward_example: is moed running? (systemctl start moed.socket, "
			"or give its socket as the argument or in MOED_SOCKET)\n");
		return 1;
	}
	moe_client_info(c, &info);
	printf("model %s on %s: hidden %u, %u experts, top-%u, %u of %u layers MoE\n", info.model_type,
	       info.backend, info.hidden_size, info.num_experts, info.top_k, info.num_moe_layers,
	       info.num_hidden_layers);
	if (info.num_moe_layers == 0) {
		fprintf(stderr, "moe_forward_example: the model has no MoE layer\n");
		goto out;
	}
	layer = info.moe_layers[0];
	tokens = TOKENS < info.max_tokens ? TOKENS : info.max_tokens;
	act_bytes = tokens * info.hidden_size * sizeof(float);
	route_bytes = tokens * info.top_k * sizeof(float);

	/* a batch of random hidden states in [-1, 1) */
	input = malloc(act_bytes);
	output = malloc(act_bytes);
	ids = malloc(route_bytes);
	weights = malloc(route_bytes);
	if (!input || !output || !ids || !weights) {
		fprintf(stderr, "moe_forward_example: out of memory\n");
		goto out;
	}
	srand(1);
	for (size_t i = 0; i < tokens * info.hidden_size; i++)
		input[i] = 2.0f * (float)rand() / (float)RAND_MAX - 1.0f;

	/* 1. synchronous: the library copies in, submits, waits, copies out */
	r = moe_client_forward(c, layer, MOE_F32, input, output, tokens, ids, weights);
	if (r < 0) {
		fail("moe_client_forward", r);
		goto out;
	}
	printf("layer %u, %llu tokens, moe_client_forward:\n", layer, (unsigned long long)tokens);
	for (t = 0; t < tokens; t++)
		print_token(t, output, ids, weights, &info);

	/* 2. asynchronous: the tensors live in the shared arena */
	if ((r = moe_client_alloc(c, act_bytes, &a_in)) < 0 ||
	    (r = moe_client_alloc(c, act_bytes, &a_out)) < 0 ||
	    (r = moe_client_alloc(c, route_bytes, &a_ids)) < 0 ||
	    (r = moe_client_alloc(c, route_bytes, &a_weights)) < 0) {
		fail("moe_client_alloc", r);
		goto out;
	}
	memcpy(a_in, input, act_bytes);
	req = (struct moe_request){
		.layer = layer, .dtype = MOE_F32, .tokens = tokens, .input = a_in, .output = a_out,
		.ids = a_ids, .weights = a_weights, .user_data = 1,
	};
	r = moe_client_submit(c, &req);
	if (r < 0) {
		fail("moe_client_submit", r);
		goto out;
	}
	/* other work could go here: moed computes meanwhile */
	r = moe_client_wait(c, &cqe, 10000);
	if (r < 0) {
		fail("moe_client_wait", r);
		goto out;
	}
	if (cqe.res < 0) {
		fail("the request", cqe.res);
		goto out;
	}
	printf("layer %u, %llu tokens, moe_client_submit + moe_client_wait (request %llu):\n", layer,
	       (unsigned long long)tokens, (unsigned long long)cqe.user_data);
	for (t = 0; t < tokens; t++)
		print_token(t, a_out, a_ids, a_weights, &info);

	/* the same tokens give the same bits, however they were sent */
	if (memcmp(a_out, output, act_bytes) || memcmp(a_ids, ids, route_bytes) ||
	    memcmp(a_weights, weights, route_bytes)) {
		fprintf(stderr, "moe_forward_example: the two results differ\n");
		goto out;
	}
	printf("both give the same bits\n");
	status = 0;
out:
	moe_client_free(c, a_in);
	moe_client_free(c, a_out);
	moe_client_free(c, a_ids);
	moe_client_free(c, a_weights);
	free(input);
	free(output);
	free(ids);
	free(weights);
	moe_client_disconnect(c);
	return status;
}
