/* SPDX-License-Identifier: MIT */
/*
 * The float64 reference's loader (see ref.h): a layer read straight from a
 * Hugging Face checkpoint (config.json and safetensors), every dtype
 * decoded here from its definition (bf16, f16; the quantized formats in
 * ref_quant.c), each architecture's tensor names and layouts.  Written from the upstream
 * model code, not from formats/ or the engine: keep it that way.
 */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/err.h"
#include "ref.h"
#include "formats/safetensors.h"
#include "ref_load_impl.h"

/* ---- loading a checkpoint ---------------------------------------------- */

int ref_ld_fail(struct loader *ld, int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(ld->msg, ld->msglen, fmt, ap);
	va_end(ap);
	return code;
}

const struct moe_st_tensor *ref_ld_find(struct loader *ld, const char *fmt, ...)
{
	char name[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(name, sizeof(name), fmt, ap);
	va_end(ap);
	return moe_st_find(ld->ck, name);
}

/*
 * Decode @count elements of tensor @t starting at element @first into
 * dst[0..count), checking that the tensor has @nelem elements in all.
 */
int ref_ld_read_elems(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem,
		      uint64_t first, uint64_t count, double *dst)
{
	struct moe_err err = {0};
	uint64_t have = 1, esz;
	unsigned char *buf;
	int rc;

	for (uint32_t d = 0; d < t->ndim; d++)
		have *= t->shape[d];
	if (have != nelem)
		return ref_ld_fail(ld, -EINVAL, "%s: %llu elements, expected %llu", t->name,
			    (unsigned long long)have, (unsigned long long)nelem);
	if (!strcmp(t->st_dtype, "F32"))
		esz = 4;
	else if (!strcmp(t->st_dtype, "BF16") || !strcmp(t->st_dtype, "F16"))
		esz = 2;
	else
		return ref_ld_fail(ld, -EINVAL, "%s: dtype %s is not one the reference reads",
			    t->name, t->st_dtype);
	if (t->nbytes != nelem * esz)
		return ref_ld_fail(ld, -EINVAL, "%s: %llu bytes for %llu elements of %s", t->name,
			    (unsigned long long)t->nbytes, (unsigned long long)nelem, t->st_dtype);
	buf = malloc(count * esz);
	if (!buf)
		return ref_ld_fail(ld, -ENOMEM, "out of memory");
	rc = moe_st_read(ld->ck, t, first * esz, buf, count * esz, &err);
	if (rc < 0) {
		free(buf);
		return ref_ld_fail(ld, rc, "%s", err.msg);
	}
	for (uint64_t i = 0; i < count; i++) {
		const unsigned char *b = buf + i * esz;

		if (esz == 4) {
			/* little-endian binary32, decoded field by field */
			uint32_t u = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
				     (uint32_t)b[3] << 24;
			int sign = u >> 31, e = (int)((u >> 23) & 0xff);
			uint32_t f = u & 0x7fffffu;
			double v;

			if (e == 0xff)
				v = f ? NAN : INFINITY;
			else if (e == 0)
				v = ldexp((double)f, -126 - 23);
			else
				v = ldexp((double)(f | 0x800000u), e - 127 - 23);
			dst[i] = sign ? -v : v;
		} else {
			uint16_t h = (uint16_t)(b[0] | b[1] << 8);

			dst[i] = t->st_dtype[0] == 'B' ? ref_bf16_to_double(h) : ref_f16_to_double(h);
		}
	}
	free(buf);
	return 0;
}

/* Allocate and read a whole tensor of @nelem elements (an FP8 matrix
 * dequantized with its scales). */
static int read_tensor(struct loader *ld, const struct moe_st_tensor *t, uint64_t nelem,
		       double **ret)
{
	double *d = malloc(sizeof(double) * (nelem ? nelem : 1));
	int rc;

	if (!d)
		return ref_ld_fail(ld, -ENOMEM, "out of memory");
	if (!strcmp(t->st_dtype, "F8_E4M3"))
		rc = ref_ld_read_fp8(ld, t, nelem, d);
	else if (!strcmp(t->st_dtype, "I32"))
		rc = ref_ld_read_int4(ld, t, nelem, d);
	else
		rc = ref_ld_read_elems(ld, t, nelem, 0, nelem, d);
	if (rc < 0) {
		free(d);
		return rc;
	}
	*ret = d;
	return 0;
}

static int json_u32(json_t *cfg, const char *key, uint32_t dflt, uint32_t *ret)
{
	json_t *v = json_object_get(cfg, key);

	if (!v || json_is_null(v)) {
		*ret = dflt;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < 0 ||
	    json_integer_value(v) > (json_int_t)UINT32_MAX)
		return -EINVAL;
	*ret = (uint32_t)json_integer_value(v);
	return 0;
}

static bool json_bool(json_t *cfg, const char *key, bool dflt)
{
	json_t *v = json_object_get(cfg, key);

	if (!v || !json_is_boolean(v))
		return dflt;
	return json_is_true(v);
}

static double json_num(json_t *cfg, const char *key, double dflt)
{
	json_t *v = json_object_get(cfg, key);

	if (!v || !json_is_number(v))
		return dflt;
	return json_number_value(v);
}

static const char *json_str(json_t *cfg, const char *key, const char *dflt)
{
	json_t *v = json_object_get(cfg, key);

	if (!v || !json_is_string(v))
		return dflt;
	return json_string_value(v);
}

/* The routing rule and activation of config.json, with Hugging Face's
 * defaults for absent fields. */
static int read_config(struct loader *ld, const char *hf_dir, struct ref_layer *l)
{
	static const struct { const char *name; enum moe_arch arch; } archs[] = {
		{ "mixtral", MOE_ARCH_MIXTRAL }, { "qwen2_moe", MOE_ARCH_QWEN2_MOE },
		{ "qwen3_moe", MOE_ARCH_QWEN3_MOE }, { "olmoe", MOE_ARCH_OLMOE },
		{ "deepseek_v2", MOE_ARCH_DEEPSEEK_V2 }, { "deepseek_v3", MOE_ARCH_DEEPSEEK_V3 },
		{ "glm4_moe", MOE_ARCH_GLM4_MOE }, { "gpt_oss", MOE_ARCH_GPT_OSS },
	};
	struct ref_routing *r = &l->routing;
	char path[4096];
	json_error_t jerr;
	const char *mt, *act, *method;
	json_t *cfg;
	bool found = false;
	int rc = 0;

	snprintf(path, sizeof(path), "%s/config.json", hf_dir);
	cfg = json_load_file(path, 0, &jerr);
	if (!cfg)
		return ref_ld_fail(ld, -EINVAL, "%s: %s", path, jerr.text);
	{
		json_t *q = json_object_get(cfg, "quantization_config");

		if (q && json_is_object(q)) {
			snprintf(ld->quant, sizeof(ld->quant), "%s", json_str(q, "quant_method", ""));
			ld->gptq_v1 = !strcmp(json_str(q, "checkpoint_format", "gptq"), "gptq");
			json_t *g = json_object_get(q, "config_groups");
			const char *key;
			json_t *grp;

			if (g && json_is_object(g))
				json_object_foreach(g, key, grp) {
					json_t *w = json_object_get(grp, "weights");

					if (w && json_is_false(json_object_get(w, "symmetric")))
						ld->ct_asym = true;
				}
		}
	}
	mt = json_str(cfg, "model_type", "");
	for (size_t i = 0; i < sizeof(archs) / sizeof(archs[0]); i++)
		if (!strcmp(mt, archs[i].name)) {
			r->arch = archs[i].arch;
			found = true;
		}
	if (!found) {
		rc = ref_ld_fail(ld, -EINVAL, "%s: model_type \"%s\" unknown to the reference", path, mt);
		goto out;
	}

	act = json_str(cfg, "hidden_act", "silu");
	if (!strcmp(act, "silu") || !strcmp(act, "swish"))
		l->act = MOE_ACT_SILU;
	else if (!strcmp(act, "gelu"))
		l->act = MOE_ACT_GELU;
	else if (!strcmp(act, "gelu_pytorch_tanh") || !strcmp(act, "gelu_new") ||
		 !strcmp(act, "gelu_fast"))
		l->act = MOE_ACT_GELU_TANH;
	else if (!strcmp(act, "relu"))
		l->act = MOE_ACT_RELU;
	else {
		rc = ref_ld_fail(ld, -EINVAL, "%s: hidden_act \"%s\" unknown to the reference", path, act);
		goto out;
	}

	r->n_group = 1;
	r->topk_group = 1;
	r->group_limited = false;
	r->routed_scaling_factor = 1.0;
	switch (r->arch) {
	case MOE_ARCH_MIXTRAL:
		rc = json_u32(cfg, "num_local_experts", 8, &r->num_experts);
		rc = rc ? rc : json_u32(cfg, "num_experts_per_tok", 2, &r->top_k);
		r->norm_topk_prob = true;
		break;
	case MOE_ARCH_QWEN2_MOE:
	case MOE_ARCH_QWEN3_MOE:
	case MOE_ARCH_OLMOE:
		rc = json_u32(cfg, "num_experts", 60, &r->num_experts);
		rc = rc ? rc : json_u32(cfg, "num_experts_per_tok", 4, &r->top_k);
		r->norm_topk_prob = json_bool(cfg, "norm_topk_prob", false);
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3: {
		bool v3 = r->arch == MOE_ARCH_DEEPSEEK_V3;

		rc = json_u32(cfg, "n_routed_experts", v3 ? 256 : 64, &r->num_experts);
		rc = rc ? rc : json_u32(cfg, "num_experts_per_tok", v3 ? 8 : 6, &r->top_k);
		rc = rc ? rc : json_u32(cfg, "n_group", v3 ? 8 : 1, &r->n_group);
		rc = rc ? rc : json_u32(cfg, "topk_group", v3 ? 4 : 1, &r->topk_group);
		r->norm_topk_prob = json_bool(cfg, "norm_topk_prob", v3);
		r->routed_scaling_factor = json_num(cfg, "routed_scaling_factor", v3 ? 2.5 : 1.0);
		method = json_str(cfg, "topk_method", v3 ? "noaux_tc" : "greedy");
		if (v3 && strcmp(method, "noaux_tc")) {
			rc = ref_ld_fail(ld, -EINVAL, "%s: topk_method \"%s\" for deepseek_v3", path, method);
			goto out;
		}
		if (!v3) {
			if (!strcmp(method, "group_limited_greedy"))
				r->group_limited = true;
			else if (strcmp(method, "greedy") && strcmp(method, "gready")) {
				rc = ref_ld_fail(ld, -EINVAL, "%s: topk_method \"%s\" unknown to the reference",
					  path, method);
				goto out;
			}
		}
		if (strcmp(json_str(cfg, "scoring_func", v3 ? "sigmoid" : "softmax"),
			   v3 ? "sigmoid" : "softmax")) {
			rc = ref_ld_fail(ld, -EINVAL, "%s: unexpected scoring_func", path);
			goto out;
		}
		break;
	}
	case MOE_ARCH_GLM4_MOE:
		/* Glm4MoeConfig's defaults; its class has no scoring_func or
		 * topk_method, so a value other than DeepSeek-V3's is not one
		 * transformers would honour. */
		rc = json_u32(cfg, "n_routed_experts", 128, &r->num_experts);
		rc = rc ? rc : json_u32(cfg, "num_experts_per_tok", 8, &r->top_k);
		rc = rc ? rc : json_u32(cfg, "n_group", 1, &r->n_group);
		rc = rc ? rc : json_u32(cfg, "topk_group", 1, &r->topk_group);
		r->norm_topk_prob = json_bool(cfg, "norm_topk_prob", true);
		r->routed_scaling_factor = json_num(cfg, "routed_scaling_factor", 1.0);
		if (strcmp(json_str(cfg, "scoring_func", "sigmoid"), "sigmoid") ||
		    strcmp(json_str(cfg, "topk_method", "noaux_tc"), "noaux_tc")) {
			rc = ref_ld_fail(ld, -EINVAL, "%s: glm4_moe with another scoring_func or topk_method", path);
			goto out;
		}
		break;
	case MOE_ARCH_GPT_OSS:
		/* GptOssConfig's defaults; GptOssExperts applies its own
		 * activation whatever hidden_act says */
		rc = json_u32(cfg, "num_local_experts", 128, &r->num_experts);
		rc = rc ? rc : json_u32(cfg, "num_experts_per_tok", 4, &r->top_k);
		r->norm_topk_prob = true;
		l->act = MOE_ACT_SWIGLU_OAI;
		l->swiglu_alpha = json_num(cfg, "swiglu_alpha", 1.702);
		l->swiglu_limit = json_num(cfg, "swiglu_limit", 7.0);
		break;
	default:
		break;
	}
	if (rc < 0) {
		rc = ref_ld_fail(ld, rc, "%s: a size field is not a non-negative integer", path);
		goto out;
	}
	if (r->num_experts == 0 || r->num_experts > REF_MAX_EXPERTS || r->top_k == 0 ||
	    r->top_k > r->num_experts || r->n_group == 0 || r->num_experts % r->n_group ||
	    r->topk_group == 0 || r->topk_group > r->n_group ||
	    r->topk_group * (r->num_experts / r->n_group) < r->top_k)
		rc = ref_ld_fail(ld, -EINVAL, "%s: routing fields out of range for the reference", path);
out:
	json_decref(cfg);
	return rc;
}

/* Weight "@pfx@name.weight", or its int4 tensor (X.qweight, X.weight_packed)
 * when the checkpoint quantized it; NULL when none. */
static const struct moe_st_tensor *find_w(struct loader *ld, const char *pfx, const char *name)
{
	const struct moe_st_tensor *t = ref_ld_find(ld, "%s%s.weight", pfx, name);

	if (!t)
		t = ref_ld_find(ld, "%s%s.qweight", pfx, name);
	if (!t)
		t = ref_ld_find(ld, "%s%s.weight_packed", pfx, name);
	return t;
}

/* The [rows, cols] of weight @t as the layer uses it (an int4 tensor's
 * from its packing). */
static void w_shape(struct loader *ld, const struct moe_st_tensor *t, uint64_t *rows, uint64_t *cols)
{
	const char *dot = strrchr(t->name, '.');

	*rows = t->ndim == 2 ? t->shape[0] : 0;
	*cols = t->ndim == 2 ? t->shape[1] : 0;
	if (strcmp(t->st_dtype, "I32") || !dot || t->ndim != 2)
		return;
	if (!strcmp(dot, ".weight_packed")) {
		*cols = t->shape[1] * 8;
	} else if (!strcmp(ld->quant, "awq")) {
		*rows = t->shape[1] * 8;
		*cols = t->shape[0];
	} else {
		*rows = t->shape[1];
		*cols = t->shape[0] * 8;
	}
}

/* Shape check: tensor @t is [a, b] (or [a, b, c] when c != 0). */
static bool shape_is(const struct moe_st_tensor *t, uint64_t a, uint64_t b, uint64_t c)
{
	if (c)
		return t->ndim == 3 && t->shape[0] == a && t->shape[1] == b && t->shape[2] == c;
	return t->ndim == 2 && t->shape[0] == a && t->shape[1] == b;
}

/* A dense gated-or-plain MLP under @pfx: {gate,up,down}_proj (or w1/w3/w2). */
static int read_mlp(struct loader *ld, const char *pfx, bool mixtral_names, uint32_t H,
		    uint32_t *ret_inter, bool *ret_gated, double **g, double **u, double **d)
{
	const char *gn = mixtral_names ? "w1" : "gate_proj";
	const char *un = mixtral_names ? "w3" : "up_proj";
	const char *dn = mixtral_names ? "w2" : "down_proj";
	const struct moe_st_tensor *tg = find_w(ld, pfx, gn);
	const struct moe_st_tensor *tu = find_w(ld, pfx, un);
	const struct moe_st_tensor *td = find_w(ld, pfx, dn);
	uint64_t ur, uc, dr, dc, gr = 0, gc = 0;
	uint32_t I;
	int rc;

	if (!tu || !td)
		return ref_ld_fail(ld, -ENOENT, "%s%s.weight or %s.weight: not in the checkpoint", pfx, un, dn);
	w_shape(ld, tu, &ur, &uc);
	w_shape(ld, td, &dr, &dc);
	if (tg)
		w_shape(ld, tg, &gr, &gc);
	if (uc != H || ur == 0 || ur > (1u << 20))
		return ref_ld_fail(ld, -EINVAL, "%s: bad shape", tu->name);
	I = (uint32_t)ur;
	if (dr != H || dc != I || (tg && (gr != I || gc != H)))
		return ref_ld_fail(ld, -EINVAL, "%s: shapes disagree with %s", pfx, tu->name);
	*g = NULL;
	if (tg && (rc = read_tensor(ld, tg, (uint64_t)I * H, g)) < 0)
		return rc;
	if ((rc = read_tensor(ld, tu, (uint64_t)I * H, u)) < 0 ||
	    (rc = read_tensor(ld, td, (uint64_t)H * I, d)) < 0)
		return rc;
	*ret_inter = I;
	*ret_gated = tg != NULL;
	return 0;
}

static int read_experts(struct loader *ld, const char *pfx, const char *alt_pfx, bool mixtral,
			struct ref_layer *l)
{
	uint32_t E = l->routing.num_experts, H = l->hidden;
	const struct moe_st_tensor *fgu = ref_ld_find(ld, "%sexperts.gate_up_proj", pfx);
	const struct moe_st_tensor *fd = ref_ld_find(ld, "%sexperts.down_proj", pfx);
	int rc;

	if (!fgu && alt_pfx) {
		fgu = ref_ld_find(ld, "%sexperts.gate_up_proj", alt_pfx);
		fd = ref_ld_find(ld, "%sexperts.down_proj", alt_pfx);
	}
	if (fgu) {
		/* transformers v5 fused layout: gate_up_proj [E, 2I, H] gate rows
		 * first, down_proj [E, H, I] */
		uint32_t I;

		if (!fd)
			return ref_ld_fail(ld, -ENOENT, "%s: fused down_proj missing", fgu->name);
		if (fgu->ndim != 3 || fgu->shape[0] != E || fgu->shape[2] != H ||
		    fgu->shape[1] % 2 || fgu->shape[1] == 0)
			return ref_ld_fail(ld, -EINVAL, "%s: bad fused shape", fgu->name);
		I = (uint32_t)(fgu->shape[1] / 2);
		if (!shape_is(fd, E, H, I))
			return ref_ld_fail(ld, -EINVAL, "%s: bad fused shape", fd->name);
		size_t esz = (size_t)I * H;
		l->inter = I;
		l->gated = true;
		l->gate = malloc(sizeof(double) * esz * E);
		l->up = malloc(sizeof(double) * esz * E);
		if (!l->gate || !l->up)
			return ref_ld_fail(ld, -ENOMEM, "out of memory");
		for (uint32_t j = 0; j < E; j++) {
			if ((rc = ref_ld_read_elems(ld, fgu, (uint64_t)E * 2 * esz, (uint64_t)j * 2 * esz,
					     esz, l->gate + j * esz)) < 0 ||
			    (rc = ref_ld_read_elems(ld, fgu, (uint64_t)E * 2 * esz,
					     (uint64_t)j * 2 * esz + esz, esz, l->up + j * esz)) < 0)
				return rc;
		}
		snprintf(l->weight_dtype, sizeof(l->weight_dtype), "%s", fgu->st_dtype);
		return read_tensor(ld, fd, (uint64_t)E * esz, &l->down);
	}

	for (uint32_t j = 0; j < E; j++) {
		char epfx[512];
		double *g, *u, *d;
		uint32_t I;
		bool gated;

		snprintf(epfx, sizeof(epfx), "%sexperts.%u.", pfx, j);
		if ((rc = read_mlp(ld, epfx, mixtral, H, &I, &gated, &g, &u, &d)) < 0)
			return rc;
		if (j == 0) {
			const struct moe_st_tensor *t = find_w(ld, epfx, mixtral ? "w3" : "up_proj");

			snprintf(l->weight_dtype, sizeof(l->weight_dtype), "%s", t->st_dtype);
			l->inter = I;
			l->gated = gated;
			l->up = malloc(sizeof(double) * (size_t)E * I * H);
			l->down = malloc(sizeof(double) * (size_t)E * I * H);
			l->gate = gated ? malloc(sizeof(double) * (size_t)E * I * H) : NULL;
			if (!l->up || !l->down || (gated && !l->gate)) {
				free(g);
				free(u);
				free(d);
				return ref_ld_fail(ld, -ENOMEM, "out of memory");
			}
		}
		if (I != l->inter || gated != l->gated) {
			free(g);
			free(u);
			free(d);
			return ref_ld_fail(ld, -EINVAL, "%s: differs in shape from expert 0", epfx);
		}
		size_t esz = (size_t)I * H;
		if (gated)
			memcpy(l->gate + j * esz, g, sizeof(double) * esz);
		memcpy(l->up + j * esz, u, sizeof(double) * esz);
		memcpy(l->down + j * esz, d, sizeof(double) * esz);
		free(g);
		free(u);
		free(d);
	}
	return 0;
}

static int gpt_oss_split(struct loader *ld, struct ref_layer *l, const struct moe_st_tensor *tr,
			 const struct moe_st_tensor *tb, const struct moe_st_tensor *tgub,
			 const struct moe_st_tensor *tdb, const double *gu, const double *dn);
static int read_gpt_oss_mxfp4(struct loader *ld, const char *pfx, struct ref_layer *l,
			      const struct moe_st_tensor *mgu);

/*
 * gpt_oss in transformers' layout (modeling_gpt_oss.py): router.weight
 * [E, H] and router.bias [E]; experts.gate_up_proj [E, H, 2I] used as
 * x @ W, whose column 2i is gate row i and column 2i + 1 up row i;
 * gate_up_proj_bias [E, 2I] the same way; down_proj [E, I, H] used as
 * h @ W, so down row h is its column h; down_proj_bias [E, H].  The
 * MXFP4 release has gate_up_proj_blocks/_scales decoding to [E, 2I, H] and
 * down_proj_blocks/_scales to [E, H, I] (read_mxfp4), which transformers
 * transposes to the layout above: so does this.
 */
static int read_gpt_oss(struct loader *ld, const char *pfx, struct ref_layer *l)
{
	uint32_t E = l->routing.num_experts, H, I;
	const struct moe_st_tensor *tr = ref_ld_find(ld, "%srouter.weight", pfx);
	const struct moe_st_tensor *tb = ref_ld_find(ld, "%srouter.bias", pfx);
	const struct moe_st_tensor *tgu = ref_ld_find(ld, "%sexperts.gate_up_proj", pfx);
	const struct moe_st_tensor *tgub = ref_ld_find(ld, "%sexperts.gate_up_proj_bias", pfx);
	const struct moe_st_tensor *td = ref_ld_find(ld, "%sexperts.down_proj", pfx);
	const struct moe_st_tensor *tdb = ref_ld_find(ld, "%sexperts.down_proj_bias", pfx);
	const struct moe_st_tensor *mgu = ref_ld_find(ld, "%sexperts.gate_up_proj_blocks", pfx);
	double *gu = NULL, *dn = NULL;
	int rc;

	if (!tgu && mgu && tr && tr->ndim == 2)
		return read_gpt_oss_mxfp4(ld, pfx, l, mgu);
	if (!tr || !tb || !tgu || !tgub || !td || !tdb)
		return ref_ld_fail(ld, -ENOENT, "%s: a gpt_oss router or expert tensor is missing", pfx);
	if (tr->ndim != 2 || tr->shape[0] != E || tr->shape[1] == 0 || tr->shape[1] > (1u << 20))
		return ref_ld_fail(ld, -EINVAL, "%s: shape is not [%u, H]", tr->name, E);
	H = l->hidden = (uint32_t)tr->shape[1];
	if (tgu->ndim != 3 || tgu->shape[0] != E || tgu->shape[1] != H || tgu->shape[2] % 2 ||
	    tgu->shape[2] == 0 || tgu->shape[2] > (1u << 21))
		return ref_ld_fail(ld, -EINVAL, "%s: shape is not [%u, %u, 2I]", tgu->name, E, H);
	I = l->inter = (uint32_t)(tgu->shape[2] / 2);
	if (!shape_is(td, E, I, H) || !shape_is(tgub, E, 2 * I, 0) || !shape_is(tdb, E, H, 0) ||
	    tb->ndim != 1 || tb->shape[0] != E)
		return ref_ld_fail(ld, -EINVAL, "%s: gpt_oss shapes disagree with %s", pfx, tgu->name);
	l->gated = true;
	snprintf(l->weight_dtype, sizeof(l->weight_dtype), "%s", tgu->st_dtype);
	size_t esz = (size_t)I * H;
	if ((rc = read_tensor(ld, tgu, (uint64_t)E * 2 * esz, &gu)) < 0 ||
	    (rc = read_tensor(ld, td, (uint64_t)E * esz, &dn)) < 0)
		goto out;
	rc = gpt_oss_split(ld, l, tr, tb, tgub, tdb, gu, dn);
out:
	free(gu);
	free(dn);
	return rc;
}

/* The MXFP4 release: the matrices decoded and transposed to the bf16
 * layout, biases and router as there. */
static int read_gpt_oss_mxfp4(struct loader *ld, const char *pfx, struct ref_layer *l,
			      const struct moe_st_tensor *mgu)
{
	uint32_t E = l->routing.num_experts, H, I;
	const struct moe_st_tensor *tr = ref_ld_find(ld, "%srouter.weight", pfx);
	const struct moe_st_tensor *tb = ref_ld_find(ld, "%srouter.bias", pfx);
	const struct moe_st_tensor *tgub = ref_ld_find(ld, "%sexperts.gate_up_proj_bias", pfx);
	const struct moe_st_tensor *tdb = ref_ld_find(ld, "%sexperts.down_proj_bias", pfx);
	double *mx = NULL, *gu = NULL, *dn = NULL;
	char name[512];
	int rc;

	if (!tb || !tgub || !tdb)
		return ref_ld_fail(ld, -ENOENT, "%s: a gpt_oss router or expert bias is missing", pfx);
	H = l->hidden = (uint32_t)tr->shape[1];
	if (mgu->ndim != 4 || mgu->shape[1] % 2 || mgu->shape[1] == 0 || mgu->shape[1] > (1u << 21))
		return ref_ld_fail(ld, -EINVAL, "%s: shape is not [E, 2I, H/32, 16]", mgu->name);
	I = l->inter = (uint32_t)(mgu->shape[1] / 2);
	if (!shape_is(tgub, E, 2 * I, 0) || !shape_is(tdb, E, H, 0) || tb->ndim != 1 || tb->shape[0] != E)
		return ref_ld_fail(ld, -EINVAL, "%s: gpt_oss shapes disagree with %s", pfx, mgu->name);
	l->gated = true;
	snprintf(l->weight_dtype, sizeof(l->weight_dtype), "%s", mgu->st_dtype);   /* U8 */
	size_t esz = (size_t)I * H;
	snprintf(name, sizeof(name), "%sexperts.gate_up_proj", pfx);
	rc = ref_ld_read_mxfp4(ld, name, E, 2 * (uint64_t)I, H, &mx);
	gu = malloc(sizeof(double) * 2 * esz * E);
	dn = malloc(sizeof(double) * esz * E);
	if (rc == 0 && (!gu || !dn))
		rc = ref_ld_fail(ld, -ENOMEM, "out of memory");
	for (size_t j = 0; rc == 0 && j < E; j++)          /* [2I][H] -> [H][2I] */
		for (size_t n = 0; n < 2 * (size_t)I; n++)
			for (size_t h = 0; h < H; h++)
				gu[j * 2 * esz + h * 2 * I + n] = mx[j * 2 * esz + n * H + h];
	free(mx);
	mx = NULL;
	snprintf(name, sizeof(name), "%sexperts.down_proj", pfx);
	if (rc == 0)
		rc = ref_ld_read_mxfp4(ld, name, E, H, I, &mx);
	for (size_t j = 0; rc == 0 && j < E; j++)          /* [H][I] -> [I][H] */
		for (size_t h = 0; h < H; h++)
			for (size_t i = 0; i < I; i++)
				dn[j * esz + i * H + h] = mx[j * esz + h * I + i];
	if (rc == 0)
		rc = gpt_oss_split(ld, l, tr, tb, tgub, tdb, gu, dn);
	free(mx);
	free(gu);
	free(dn);
	return rc;
}

/* Router, biases, and gate/up/down in moed's orientation from @gu [E][H][2I]
 * and @dn [E][I][H] (transformers' bf16 layout). */
static int gpt_oss_split(struct loader *ld, struct ref_layer *l, const struct moe_st_tensor *tr,
			 const struct moe_st_tensor *tb, const struct moe_st_tensor *tgub,
			 const struct moe_st_tensor *tdb, const double *gu, const double *dn)
{
	uint32_t E = l->routing.num_experts, H = l->hidden, I = l->inter;
	size_t esz = (size_t)I * H;
	double *gub = NULL;
	int rc;

	if ((rc = read_tensor(ld, tr, (uint64_t)E * H, &l->router)) < 0 ||
	    (rc = read_tensor(ld, tb, E, &l->bias)) < 0 ||
	    (rc = read_tensor(ld, tdb, (uint64_t)E * H, &l->down_bias)) < 0 ||
	    (rc = read_tensor(ld, tgub, (uint64_t)E * 2 * I, &gub)) < 0)
		goto out;
	l->gate = malloc(sizeof(double) * esz * E);
	l->up = malloc(sizeof(double) * esz * E);
	l->down = malloc(sizeof(double) * esz * E);
	l->gate_bias = malloc(sizeof(double) * (size_t)I * E);
	l->up_bias = malloc(sizeof(double) * (size_t)I * E);
	if (!l->gate || !l->up || !l->down || !l->gate_bias || !l->up_bias) {
		rc = ref_ld_fail(ld, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t j = 0; j < E; j++) {
		const double *w = gu + j * 2 * esz, *v = dn + j * esz;

		for (size_t i = 0; i < I; i++) {
			l->gate_bias[j * I + i] = gub[j * 2 * I + 2 * i];
			l->up_bias[j * I + i] = gub[j * 2 * I + 2 * i + 1];
			for (size_t h = 0; h < H; h++) {
				l->gate[j * esz + i * H + h] = w[h * 2 * I + 2 * i];
				l->up[j * esz + i * H + h] = w[h * 2 * I + 2 * i + 1];
				l->down[j * esz + h * I + i] = v[i * H + h];
			}
		}
	}
	rc = 0;
out:
	free(gub);
	return rc;
}

int ref_layer_load(const char *hf_dir, uint32_t layer, struct ref_layer **ret,
		   char *msg, size_t msglen)
{
	struct loader ld = { .msg = msg, .msglen = msglen };
	struct ref_layer *l = calloc(1, sizeof(*l));
	struct moe_err err = {0};
	const struct moe_st_tensor *t;
	char pfx[256], alt[256];
	bool mixtral;
	uint32_t E, H;
	int rc;

	if (!l)
		return ref_ld_fail(&ld, -ENOMEM, "out of memory");
	l->layer = layer;
	if ((rc = read_config(&ld, hf_dir, l)) < 0)
		goto bad;
	rc = moe_st_checkpoint_open(hf_dir, &ld.ck, &err);
	if (rc < 0) {
		rc = ref_ld_fail(&ld, rc, "%s", err.msg);
		goto bad;
	}
	mixtral = l->routing.arch == MOE_ARCH_MIXTRAL;
	snprintf(pfx, sizeof(pfx), "model.layers.%u.%s", layer, mixtral ? "block_sparse_moe." : "mlp.");
	snprintf(alt, sizeof(alt), "model.layers.%u.mlp.", layer);
	E = l->routing.num_experts;

	if (l->routing.arch == MOE_ARCH_GPT_OSS) {
		rc = read_gpt_oss(&ld, pfx, l);
		if (rc < 0)
			goto bad;
		moe_st_checkpoint_close(ld.ck);
		*ret = l;
		return 0;
	}
	t = ref_ld_find(&ld, "%sgate.weight", pfx);
	if (!t && mixtral)
		t = ref_ld_find(&ld, "%sgate.weight", alt);
	if (!t) {
		rc = ref_ld_fail(&ld, -ENOENT, "%sgate.weight: not in the checkpoint", pfx);
		goto bad;
	}
	if (t->ndim != 2 || t->shape[0] != E || t->shape[1] == 0 || t->shape[1] > (1u << 20)) {
		rc = ref_ld_fail(&ld, -EINVAL, "%s: shape is not [%u, H]", t->name, E);
		goto bad;
	}
	H = l->hidden = (uint32_t)t->shape[1];
	if ((rc = read_tensor(&ld, t, (uint64_t)E * H, &l->router)) < 0)
		goto bad;

	if (l->routing.arch == MOE_ARCH_DEEPSEEK_V3 || l->routing.arch == MOE_ARCH_GLM4_MOE) {
		t = ref_ld_find(&ld, "%sgate.e_score_correction_bias", pfx);
		if (!t) {
			rc = ref_ld_fail(&ld, -ENOENT, "%sgate.e_score_correction_bias: missing", pfx);
			goto bad;
		}
		if ((rc = read_tensor(&ld, t, E, &l->bias)) < 0)
			goto bad;
	}

	if ((rc = read_experts(&ld, pfx, mixtral ? alt : NULL, mixtral, l)) < 0)
		goto bad;

	if (l->routing.arch == MOE_ARCH_QWEN2_MOE) {
		char spfx[300];

		snprintf(spfx, sizeof(spfx), "%sshared_expert.", pfx);
		t = find_w(&ld, spfx, "up_proj");
		if (t) {
			if ((rc = read_mlp(&ld, spfx, false, H, &l->shared_inter, &l->shared_gated,
					   &l->sh_gate, &l->sh_up, &l->sh_down)) < 0)
				goto bad;
			t = ref_ld_find(&ld, "%sshared_expert_gate.weight", pfx);
			if (!t) {
				rc = ref_ld_fail(&ld, -ENOENT, "%sshared_expert_gate.weight: missing", pfx);
				goto bad;
			}
			if ((rc = read_tensor(&ld, t, H, &l->sh_gate_vec)) < 0)
				goto bad;
		}
	} else if (l->routing.arch == MOE_ARCH_DEEPSEEK_V2 ||
		   l->routing.arch == MOE_ARCH_DEEPSEEK_V3 ||
		   l->routing.arch == MOE_ARCH_GLM4_MOE) {
		char spfx[300];

		snprintf(spfx, sizeof(spfx), "%sshared_experts.", pfx);
		t = find_w(&ld, spfx, "up_proj");
		if (t && (rc = read_mlp(&ld, spfx, false, H, &l->shared_inter, &l->shared_gated,
					&l->sh_gate, &l->sh_up, &l->sh_down)) < 0)
			goto bad;
	}
	moe_st_checkpoint_close(ld.ck);
	*ret = l;
	return 0;
bad:
	if (ld.ck)
		moe_st_checkpoint_close(ld.ck);
	ref_layer_free(l);
	return rc;
}
