/* SPDX-License-Identifier: MIT */
/*
 * The layout of <moeclient.h>'s structures as the compiler sees them, for
 * tests/python/test_client_layout.py to compare with the ctypes mirrors of
 * python/moed/_lib.py: a field added or moved in the header without the
 * same change there fails make check instead of corrupting memory.
 *
 * Output, one line each: "STRUCT size N" and "STRUCT.FIELD OFFSET SIZE".
 */
#include <stddef.h>
#include <stdio.h>

#include "moeclient.h"

#define STRUCT(s) printf(#s " size %zu\n", sizeof(struct s))
#define FIELD(s, f) printf(#s "." #f " %zu %zu\n", offsetof(struct s, f), sizeof(((struct s *)0)->f))

int main(void)
{
	STRUCT(moe_client_options);
	FIELD(moe_client_options, arena_bytes);
	FIELD(moe_client_options, sq_entries);
	FIELD(moe_client_options, reserved);

	STRUCT(moe_model_info);
	FIELD(moe_model_info, model_type);
	FIELD(moe_model_info, backend);
	FIELD(moe_model_info, hidden_size);
	FIELD(moe_model_info, moe_intermediate_size);
	FIELD(moe_model_info, num_experts);
	FIELD(moe_model_info, top_k);
	FIELD(moe_model_info, num_hidden_layers);
	FIELD(moe_model_info, num_moe_layers);
	FIELD(moe_model_info, moe_layers);
	FIELD(moe_model_info, weight_dtype);
	FIELD(moe_model_info, n_shared_experts);
	FIELD(moe_model_info, max_tokens);
	FIELD(moe_model_info, arena_bytes);

	STRUCT(moe_request);
	FIELD(moe_request, layer);
	FIELD(moe_request, dtype);
	FIELD(moe_request, tokens);
	FIELD(moe_request, input);
	FIELD(moe_request, output);
	FIELD(moe_request, ids);
	FIELD(moe_request, weights);
	FIELD(moe_request, user_data);

	STRUCT(moe_completion);
	FIELD(moe_completion, user_data);
	FIELD(moe_completion, res);

	/* constants the package copies */
	printf("const MOE_F32 %d\n", MOE_F32);
	printf("const MOE_BF16 %d\n", MOE_BF16);
	printf("const MOE_E_PROTO %d\n", MOE_E_PROTO);
	printf("const MOE_E_LAYER %d\n", MOE_E_LAYER);
	printf("const MOE_E_CHECKSUM %d\n", MOE_E_CHECKSUM);
	printf("const MOE_DEFAULT_SOCKET %s\n", MOE_DEFAULT_SOCKET);
#ifdef MOE_FINGERPRINT_LEN
	printf("const MOE_FINGERPRINT_LEN %d\n", MOE_FINGERPRINT_LEN);
#endif
	return 0;
}
