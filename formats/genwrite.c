/* SPDX-License-Identifier: MIT */
/*
 * gen-model's writing: config.json, the safetensors shards (generation and
 * writing overlapped through two buffers) and model.safetensors.index.json.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <jansson.h>

#include <jansson.h>

#include "genmodel_impl.h"
#include "hfq4.h"
#include "safetensors.h"

/* ------------------------------------------------------------ writing */

static void json_set(json_t *o, const char *k, json_t *v)
{
	json_object_set_new(o, k, v);
}

/* A float option as the shortest decimal that reads back as the same float:
 * 2.827 rather than 2.826999903, as the released config.json says it. */
static json_t *json_float(float f)
{
	char buf[32];

	for (int prec = 6; prec < 9; prec++) {
		snprintf(buf, sizeof(buf), "%.*g", prec, (double)f);
		if (strtof(buf, NULL) == f)
			return json_real(strtod(buf, NULL));
	}
	return json_real((double)f);
}

/*
 * quantization_config of an int4 checkpoint, field for field as GPTQModel
 * (checkpoint_format gptq), AutoAWQ (gemm) and llm-compressor
 * (compressed-tensors pack-quantized, Kimi-K2-Thinking's ignore list)
 * write it.
 */
static json_t *q4_config(const struct gen_dims *d)
{
	json_int_t g = d->q4_group ? (json_int_t)d->q4_group : -1;

	if (d->q4 == MOE_Q4F_GPTQ)
		return json_pack("{s:i,s:I,s:b,s:b,s:f,s:b,s:b,s:s,s:s,s:s}", "bits", 4, "group_size", g,
				 "desc_act", d->q4_desc_act, "sym", d->q4_sym, "damp_percent", 0.01,
				 "static_groups", 0, "true_sequential", 1, "quant_method", "gptq",
				 "checkpoint_format", "gptq", "model_file_base_name", "model");
	if (d->q4 == MOE_Q4F_AWQ)
		return json_pack("{s:s,s:i,s:I,s:s,s:b,s:n}", "quant_method", "awq", "bits", 4,
				 "group_size", g, "version", "gemm", "zero_point", 1,
				 "modules_to_not_convert");
	return json_pack("{s:{s:{s:n,s:n,s:[s],s:{s:n,s:n,s:b,s:I,s:i,s:s,s:{},s:s,s:b,s:s}}},"
			 "s:s,s:[s,s,s],s:n,s:s,s:s}",
			 "config_groups", "group_0", "input_activations", "output_activations",
			 "targets", "Linear", "weights", "actorder", "block_structure", "dynamic", 0,
			 "group_size", g, "num_bits", 4, "observer", "minmax", "observer_kwargs",
			 "strategy", "group", "symmetric", 1, "type", "int",
			 "format", "pack-quantized", "ignore", "lm_head", "re:.*self_attn.*",
			 "re:.*mlp\\.gate$", "kv_cache_scheme", "quant_method", "compressed-tensors",
			 "quantization_status", "compressed");
}

static json_t *config_json(const struct gen_dims *d)
{
	static const char *const archs[MOE_ARCH_COUNT] = {
		[MOE_ARCH_MIXTRAL] = "MixtralForCausalLM",
		[MOE_ARCH_QWEN2_MOE] = "Qwen2MoeForCausalLM",
		[MOE_ARCH_QWEN3_MOE] = "Qwen3MoeForCausalLM",
		[MOE_ARCH_OLMOE] = "OlmoeForCausalLM",
		[MOE_ARCH_DEEPSEEK_V2] = "DeepseekV2ForCausalLM",
		[MOE_ARCH_DEEPSEEK_V3] = "DeepseekV3ForCausalLM",
		[MOE_ARCH_GLM4_MOE] = "Glm4MoeForCausalLM",
		[MOE_ARCH_GPT_OSS] = "GptOssForCausalLM",
	};
	static const char *const torch_dtypes[MOE_DTYPE_COUNT] = {
		[MOE_DTYPE_F32] = "float32", [MOE_DTYPE_BF16] = "bfloat16", [MOE_DTYPE_F16] = "float16",
	};
	json_t *c = json_object();

	if (!c)
		return NULL;
	/* Fields every one of these configs has. */
	json_set(c, "architectures", json_pack("[s]", archs[d->arch]));
	json_set(c, "model_type", json_string(moe_arch_name(d->arch)));
	json_set(c, "attention_dropout", json_real(0.0));
	json_set(c, "hidden_act", json_string(d->act));
	json_set(c, "hidden_size", json_integer(d->H));
	json_set(c, "initializer_range", json_real(0.02));
	json_set(c, "num_attention_heads", json_integer(d->heads));
	json_set(c, "num_key_value_heads", json_integer(d->kv_heads));
	json_set(c, "num_hidden_layers", json_integer(d->L));
	json_set(c, "num_experts_per_tok", json_integer(d->k));
	json_set(c, "vocab_size", json_integer(d->V));
	json_set(c, "tie_word_embeddings", json_false());
	json_set(c, "torch_dtype", json_string(torch_dtypes[d->dtype]));
	json_set(c, "use_cache", json_true());
	json_set(c, "transformers_version", json_string("4.51.0"));
	if (d->fp8) { /* DeepSeek-V3's, field for field */
		json_t *q = json_pack("{s:s,s:s,s:s,s:[i,i]}", "activation_scheme", "dynamic", "fmt", "e4m3",
				      "quant_method", "fp8", "weight_block_size", MOE_FP8_BLOCK, MOE_FP8_BLOCK);

		/* quant_skip: what transformers' FineGrainedFP8Config (and
		 * vLLM, for want of ignored_layers) leaves unquantized: the
		 * modules whose name contains one of these */
		if (q && (!d->fp8_shared || !d->fp8_routed))
			json_set(q, "modules_to_not_convert",
				 json_pack("[s]", !d->fp8_shared ? "mlp.shared_experts" : "mlp.experts"));
		json_set(c, "quantization_config", q);
	}

	if (d->q4)
		json_set(c, "quantization_config", q4_config(d));

	switch (d->arch) {
	case MOE_ARCH_MIXTRAL:
		json_set(c, "intermediate_size", json_integer(d->I));
		json_set(c, "num_local_experts", json_integer(d->E));
		json_set(c, "bos_token_id", json_integer(1));
		json_set(c, "eos_token_id", json_integer(2));
		json_set(c, "max_position_embeddings", json_integer(32768));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "rope_theta", json_real(1e6));
		json_set(c, "router_aux_loss_coef", json_real(0.02));
		json_set(c, "router_jitter_noise", json_real(0.0));
		json_set(c, "sliding_window", json_null());
		break;
	case MOE_ARCH_QWEN2_MOE:
	case MOE_ARCH_QWEN3_MOE:
		json_set(c, "intermediate_size", json_integer(d->dense_I));
		json_set(c, "moe_intermediate_size", json_integer(d->I));
		json_set(c, "num_experts", json_integer(d->E));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "decoder_sparse_step", json_integer(d->sparse_step));
		json_set(c, "mlp_only_layers", json_array());
		json_set(c, "bos_token_id", json_integer(151643));
		json_set(c, "eos_token_id", json_integer(d->arch == MOE_ARCH_QWEN3_MOE ? 151645 : 151643));
		json_set(c, "max_position_embeddings", json_integer(d->arch == MOE_ARCH_QWEN3_MOE ? 40960 : 32768));
		json_set(c, "max_window_layers", json_integer(d->L));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-6));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_real(1e6));
		json_set(c, "router_aux_loss_coef", json_real(0.001));
		json_set(c, "use_sliding_window", json_false());
		if (d->arch == MOE_ARCH_QWEN2_MOE) {
			json_set(c, "shared_expert_intermediate_size", json_integer(d->shared_I));
			json_set(c, "sliding_window", json_integer(32768));
		} else {
			json_set(c, "head_dim", json_integer(d->head_dim));
			json_set(c, "attention_bias", json_false());
			json_set(c, "sliding_window", json_null());
		}
		break;
	case MOE_ARCH_OLMOE:
		json_set(c, "intermediate_size", json_integer(d->I));
		json_set(c, "num_experts", json_integer(d->E));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "attention_bias", json_false());
		json_set(c, "clip_qkv", json_null());
		json_set(c, "eos_token_id", json_integer(50279));
		json_set(c, "pad_token_id", json_integer(1));
		json_set(c, "max_position_embeddings", json_integer(4096));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_real(10000.0));
		json_set(c, "router_aux_loss_coef", json_real(0.01));
		break;
	case MOE_ARCH_DEEPSEEK_V2:
	case MOE_ARCH_DEEPSEEK_V3: {
		bool v3 = d->arch == MOE_ARCH_DEEPSEEK_V3;

		json_set(c, "intermediate_size", json_integer(d->dense_I));
		json_set(c, "moe_intermediate_size", json_integer(d->I));
		json_set(c, "n_routed_experts", json_integer(d->E));
		json_set(c, "n_shared_experts", d->n_shared ? json_integer(d->n_shared) : json_null());
		json_set(c, "n_group", json_integer(d->n_group));
		json_set(c, "topk_group", json_integer(d->topk_group));
		json_set(c, "topk_method", json_string(d->topk_method));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "routed_scaling_factor", json_float(d->scaling));
		json_set(c, "scoring_func", json_string(v3 ? "sigmoid" : "softmax"));
		json_set(c, "first_k_dense_replace", json_integer(d->first_dense));
		json_set(c, "moe_layer_freq", json_integer(1));
		json_set(c, "aux_loss_alpha", json_real(0.001));
		json_set(c, "seq_aux", json_true());
		json_set(c, "ep_size", json_integer(1));
		json_set(c, "kv_lora_rank", json_integer(d->kv_lora));
		json_set(c, "q_lora_rank", d->q_lora ? json_integer(d->q_lora) : json_null());
		json_set(c, "qk_nope_head_dim", json_integer(d->nope));
		json_set(c, "qk_rope_head_dim", json_integer(d->rope));
		json_set(c, "v_head_dim", json_integer(d->v_head));
		json_set(c, "attention_bias", json_false());
		json_set(c, "pretraining_tp", json_integer(1));
		json_set(c, "bos_token_id", json_integer(v3 ? 0 : 100000));
		json_set(c, "eos_token_id", json_integer(v3 ? 1 : 100001));
		json_set(c, "max_position_embeddings", json_integer(163840));
		json_set(c, "rms_norm_eps", json_real(1e-6));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_integer(10000));
		if (v3)
			json_set(c, "num_nextn_predict_layers", json_integer(d->mtp));
		break;
	}
	case MOE_ARCH_GLM4_MOE:
		/* GLM-4.5-Air's config.json: Glm4MoeConfig's fields, and no
		 * scoring_func, topk_method, moe_layer_freq or MLA fields. */
		json_set(c, "intermediate_size", json_integer(d->dense_I));
		json_set(c, "moe_intermediate_size", json_integer(d->I));
		json_set(c, "n_routed_experts", json_integer(d->E));
		json_set(c, "n_shared_experts", json_integer(d->n_shared));
		json_set(c, "n_group", json_integer(d->n_group));
		json_set(c, "topk_group", json_integer(d->topk_group));
		json_set(c, "norm_topk_prob", json_boolean(d->norm_topk));
		json_set(c, "routed_scaling_factor", json_float(d->scaling));
		json_set(c, "first_k_dense_replace", json_integer(d->first_dense));
		json_set(c, "num_nextn_predict_layers", json_integer(d->mtp));
		json_set(c, "head_dim", json_integer(d->head_dim));
		json_set(c, "attention_bias", json_true());
		json_set(c, "use_qk_norm", json_boolean(d->qk_norm));
		json_set(c, "partial_rotary_factor", json_real(0.5));
		json_set(c, "pad_token_id", json_integer(151329));
		json_set(c, "eos_token_id", json_pack("[iii]", 151329, 151336, 151338));
		json_set(c, "max_position_embeddings", json_integer(d->max_pos ? d->max_pos : 131072));
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "rope_scaling", json_null());
		json_set(c, "rope_theta", json_integer(1000000));
		json_set(c, "transformers_version", json_string("4.54.0"));
		break;
	case MOE_ARCH_GPT_OSS: {
		/* gpt-oss-20b's config.json as transformers reads it; with
		 * --quant mxfp4 the release's quantization_config too, else this
		 * is the bf16 layout.  Sliding and full attention alternate. */
		json_t *types = json_array(), *rope = json_object();

		if (d->mxfp4)
			json_set(c, "quantization_config",
				 json_pack("{s:[ssss],s:s}", "modules_to_not_convert", "model.layers.*.self_attn",
					   "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
					   "quant_method", "mxfp4"));

		for (uint32_t l = 0; l < d->L; l++)
			json_array_append_new(types, json_string(l % 2 ? "full_attention" : "sliding_attention"));
		json_set(rope, "rope_type", json_string("yarn"));
		json_set(rope, "factor", json_real(32.0));
		json_set(rope, "beta_fast", json_real(32.0));
		json_set(rope, "beta_slow", json_real(1.0));
		json_set(rope, "truncate", json_false());
		json_set(rope, "original_max_position_embeddings", json_integer(4096));
		json_set(c, "intermediate_size", json_integer(d->I));
		json_set(c, "num_local_experts", json_integer(d->E));
		json_set(c, "experts_per_token", json_integer(d->k));
		json_set(c, "swiglu_limit", json_real(7.0));
		json_set(c, "head_dim", json_integer(d->head_dim));
		json_set(c, "attention_bias", json_true());
		json_set(c, "layer_types", types);
		json_set(c, "sliding_window", json_integer(128));
		json_set(c, "initial_context_length", json_integer(4096));
		json_set(c, "max_position_embeddings", json_integer(131072));
		json_set(c, "rope_scaling", rope);
		json_set(c, "rope_theta", json_real(150000.0));
		json_set(c, "rms_norm_eps", json_real(1e-5));
		json_set(c, "router_aux_loss_coef", json_real(0.9));
		json_set(c, "output_router_logits", json_false());
		json_set(c, "eos_token_id", json_integer(200002));
		json_set(c, "pad_token_id", json_integer(199999));
		json_set(c, "transformers_version", json_string("4.55.0.dev0"));
		break;
	}
	default:
		break;
	}
	return c;
}

/* Dump @j to DIR/NAME with a trailing newline, as save_pretrained does. */
static int write_json(const char *dir, const char *name, const json_t *j, struct moe_err *err)
{
	char *path = NULL, *s;
	FILE *f;
	int r = 0;

	/* Sorted keys, two-space indent: what save_pretrained writes. */
	s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(10));
	if (!s || asprintf(&path, "%s/%s", dir, name) < 0) {
		free(s);
		return moe_err_set(err, -ENOMEM, "%s/%s: out of memory", dir, name);
	}
	f = fopen(path, "we");
	if (!f) {
		r = moe_err_set(err, -errno, "%s: %s", path, strerror(errno));
	} else {
		fputs(s, f);
		fputc('\n', f);
		if (ferror(f) | fclose(f))
			r = moe_err_set(err, -EIO, "%s: write failed", path);
	}
	free(s);
	free(path);
	return r;
}

static int mkdir_p(const char *dir, struct moe_err *err)
{
	char *p = strdup(dir);
	int r = 0;

	if (!p)
		return moe_err_set(err, -ENOMEM, "%s: out of memory", dir);
	for (char *c = p + 1; ; c++) {
		if (*c != '/' && *c != '\0')
			continue;
		char saved = *c;

		*c = '\0';
		if (mkdir(p, 0777) < 0 && errno != EEXIST) {
			r = moe_err_set(err, -errno, "%s: cannot create: %s", p, strerror(errno));
			break;
		}
		*c = saved;
		if (!saved)
			break;
	}
	free(p);
	if (r == 0) {
		struct stat st;

		if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
			r = moe_err_set(err, -ENOTDIR, "%s: not a directory", dir);
	}
	return r;
}

/* A checkpoint left in @dir by an earlier run must not mix with this one:
 * a stale index would win over a new model.safetensors. */
static int remove_old(const char *dir, struct moe_err *err)
{
	DIR *dh = opendir(dir);
	struct dirent *de;
	int r = 0;

	if (!dh)
		return moe_err_set(err, -errno, "%s: %s", dir, strerror(errno));
	while ((de = readdir(dh))) {
		unsigned a, b;
		int n = 0;

		if (strcmp(de->d_name, "model.safetensors") &&
		    strcmp(de->d_name, "model.safetensors.index.json") &&
		    !(sscanf(de->d_name, "model-%5u-of-%5u.safetensors%n", &a, &b, &n) == 2 &&
		      n > 0 && de->d_name[n] == '\0'))
			continue;
		if (unlinkat(dirfd(dh), de->d_name, 0) < 0) {
			r = moe_err_set(err, -errno, "%s/%s: cannot remove: %s", dir, de->d_name, strerror(errno));
			break;
		}
	}
	closedir(dh);
	return r;
}

static void shard_name(char *buf, size_t len, uint32_t shard, uint32_t n_shards)
{
	if (n_shards == 1)
		snprintf(buf, len, "model.safetensors");
	else
		snprintf(buf, len, "model-%05u-of-%05u.safetensors", shard + 1, n_shards);
}

/*
 * Generation and writing overlap: the caller fills one buffer while a thread
 * writes the other, so a checkpoint is written at the speed of the slower
 * of the two instead of their sum.  Buffers alternate strictly, so the
 * bytes land in the order they were generated.
 */
struct gen_pipe {
	pthread_mutex_t mu;
	pthread_cond_t cv;               /* any change of len[], r or closing */
	pthread_t thread;
	struct moe_st_writer *w;         /* used only by the thread until joined */
	void *buf[2];
	size_t len[2];                   /* bytes waiting in buf[i]; 0: free */
	bool closing;                    /* the caller has no more buffers */
	int r;                           /* first write error (set by the thread) */
	struct moe_err err;              /* its message */
};

static void *pipe_writer(void *arg)
{
	struct gen_pipe *pp = arg;
	unsigned s = 0;
	int r = 0;

	pthread_mutex_lock(&pp->mu);
	for (;;) {
		while (!pp->len[s] && !pp->closing)
			pthread_cond_wait(&pp->cv, &pp->mu);
		if (!pp->len[s])
			break;                   /* closing, and nothing left */
		pthread_mutex_unlock(&pp->mu);
		/* After an error, buffers are dropped so the caller never waits. */
		if (r == 0)
			r = moe_st_writer_write(pp->w, pp->buf[s], pp->len[s], &pp->err);
		pthread_mutex_lock(&pp->mu);
		pp->r = r;
		pp->len[s] = 0;
		pthread_cond_broadcast(&pp->cv);
		s ^= 1;
	}
	pthread_mutex_unlock(&pp->mu);
	return NULL;
}

static int pipe_start(struct gen_pipe *pp, struct moe_st_writer *w, void *const buf[2], struct moe_err *err)
{
	int r;

	memset(pp, 0, sizeof(*pp));
	pp->w = w;
	pp->buf[0] = buf[0];
	pp->buf[1] = buf[1];
	pthread_mutex_init(&pp->mu, NULL);
	pthread_cond_init(&pp->cv, NULL);
	r = pthread_create(&pp->thread, NULL, pipe_writer, pp);
	if (r) {
		pthread_cond_destroy(&pp->cv);
		pthread_mutex_destroy(&pp->mu);
		return moe_err_set(err, -r, "cannot start the writer thread: %s", strerror(r));
	}
	return 0;
}

/* Wait until buffer @s is free; NULL once the thread has failed. */
static void *pipe_get(struct gen_pipe *pp, unsigned s)
{
	bool ok;

	pthread_mutex_lock(&pp->mu);
	while (pp->len[s] && pp->r == 0)
		pthread_cond_wait(&pp->cv, &pp->mu);
	ok = pp->r == 0;
	pthread_mutex_unlock(&pp->mu);
	return ok ? pp->buf[s] : NULL;
}

static void pipe_put(struct gen_pipe *pp, unsigned s, size_t len)
{
	pthread_mutex_lock(&pp->mu);
	pp->len[s] = len;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
}

/* Let the thread drain and join it; its error, with its message in @err. */
static int pipe_stop(struct gen_pipe *pp, struct moe_err *err)
{
	pthread_mutex_lock(&pp->mu);
	pp->closing = true;
	pthread_cond_broadcast(&pp->cv);
	pthread_mutex_unlock(&pp->mu);
	pthread_join(pp->thread, NULL);
	pthread_cond_destroy(&pp->cv);
	pthread_mutex_destroy(&pp->mu);
	if (pp->r < 0 && err)
		*err = pp->err;
	return pp->r;
}

/* MXFP4 blocks or their scales, GEN_MX_BAND rows of values per pipe slot
 * (at most 256 x 65536 / 2 bytes: GEN_CHUNK). */
static int write_mxfp4(const struct gen_plan *p, const struct gen_tensor *t, uint64_t seed,
		       struct gen_pipe *pp, unsigned *slot, uint64_t *done,
		       void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		       struct moe_err *err)
{
	const struct gen_tensor *w = t->fill == FILL_MXFP4 ? t : &p->t[t->src];
	uint64_t key = gen_tensor_key(seed, w->name), K = w->shape[2] * MOE_MXFP4_BLOCK;
	uint64_t rows = w->shape[0] * w->shape[1];
	size_t per_row = t->fill == FILL_MXFP4 ? K / 2 : K / MOE_MXFP4_BLOCK;
	float *tmp = malloc((size_t)(GEN_MX_BAND * K * sizeof(float)));

	if (!tmp)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (uint64_t r0 = 0; r0 < rows; r0 += GEN_MX_BAND) {
		uint64_t n = rows - r0 < GEN_MX_BAND ? rows - r0 : GEN_MX_BAND;
		uint8_t *b = pipe_get(pp, *slot);

		if (!b) {
			free(tmp);
			return -EIO;          /* the real error comes from pipe_stop */
		}
		if (t->fill == FILL_MXFP4)
			gen_mxfp4_band(w, key, r0, tmp, b, NULL);
		else
			gen_mxfp4_band(w, key, r0, tmp, NULL, b);
		pipe_put(pp, *slot, n * per_row);
		*slot ^= 1;
		*done += n * per_row;
		if (progress)
			progress(ctx, *done, p->total);
	}
	free(tmp);
	return 0;
}

/* An FP8 weight (a block row per pipe slot) or its scales (in one). */
static int write_fp8(const struct gen_plan *p, const struct gen_tensor *t, uint64_t seed,
		     struct gen_pipe *pp, unsigned *slot, uint64_t *done,
		     void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		     struct moe_err *err)
{
	const struct gen_tensor *w = t->fill == FILL_FP8 ? t : &p->t[t->src];
	uint64_t key = gen_tensor_key(seed, w->name), cols = w->shape[1];
	float *tmp = malloc((size_t)(GEN_FP8_BAND * cols * sizeof(float)));

	if (!tmp)
		return moe_err_set(err, -ENOMEM, "out of memory");
	if (t->fill == FILL_FP8_SCALE) {
		float *out = pipe_get(pp, *slot);

		if (out)     /* t->nbytes: ceil(rows/128) x ceil(cols/128) floats, << GEN_CHUNK */
			gen_fp8_scales(w, key, tmp, out);
		free(tmp);
		if (!out)
			return -EIO;          /* the real error comes from pipe_stop */
		pipe_put(pp, *slot, t->nbytes);
		*slot ^= 1;
		*done += t->nbytes;
		if (progress)
			progress(ctx, *done, p->total);
		return 0;
	}
	for (uint64_t r0 = 0; r0 < t->shape[0]; r0 += GEN_FP8_BAND) {
		uint64_t n = t->shape[0] - r0 < GEN_FP8_BAND ? t->shape[0] - r0 : GEN_FP8_BAND;
		uint8_t *b = pipe_get(pp, *slot);

		if (!b) {
			free(tmp);
			return -EIO;
		}
		gen_fp8_band(t, key, r0, tmp, b);
		pipe_put(pp, *slot, n * cols);
		*slot ^= 1;
		*done += n * cols;
		if (progress)
			progress(ctx, *done, p->total);
	}
	free(tmp);
	return 0;
}

/* An int4 tensor (genq4.c): its matrix quantized once for all its
 * tensors (@q4 keeps the last), the bytes sent a GEN_CHUNK at a time. */
static int write_q4(const struct gen_dims *d, const struct gen_tensor *t, uint64_t seed,
		    struct gen_q4 *q4, struct gen_pipe *pp, unsigned *slot, uint64_t *done,
		    uint64_t total, void (*progress)(void *ctx, uint64_t done, uint64_t total),
		    void *ctx, struct moe_err *err)
{
	uint8_t *all = malloc(t->nbytes);
	int r;

	if (!all)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = gen_q4_tensor(d, t, gen_tensor_key(seed, t->wname), q4, all);
	if (r < 0) {
		free(all);
		return moe_err_set(err, r, "%s: out of memory", t->name);
	}
	for (uint64_t o = 0; o < t->nbytes; o += GEN_CHUNK) {
		uint64_t n = t->nbytes - o < GEN_CHUNK ? t->nbytes - o : GEN_CHUNK;
		void *b = pipe_get(pp, *slot);

		if (!b) {
			free(all);
			return -EIO;          /* the real error comes from pipe_stop */
		}
		memcpy(b, all + o, n);
		pipe_put(pp, *slot, n);
		*slot ^= 1;
		*done += n;
		if (progress)
			progress(ctx, *done, total);
	}
	free(all);
	return 0;
}

static int write_shard(const struct gen_plan *p, const struct gen_dims *d, uint64_t seed,
		       const char *dir, uint32_t shard, size_t *pos, void *const buf[2],
		       struct gen_q4 *q4, uint64_t *done,
		       void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		       struct moe_err *err)
{
	struct moe_st_writer *w;
	struct gen_pipe pp;
	char name[64], *path;
	size_t first = *pos, last = first;
	unsigned slot = 0;
	int r;

	shard_name(name, sizeof(name), shard, p->n_shards);
	if (asprintf(&path, "%s/%s", dir, name) < 0)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = moe_st_writer_new(path, &w, err);
	free(path);
	if (r < 0)
		return r;
	while (last < p->n && p->t[last].shard == shard) {
		const struct gen_tensor *t = &p->t[last];

		if (t->fill == FILL_Q4 && t->dtype == MOE_DTYPE_COUNT)   /* int32, int64 */
			r = moe_st_writer_declare_int(w, t->name, t->q4_part == Q4_SHAPE ? "I64" : "I32",
						      t->ndim, t->shape, err);
		else
			r = moe_st_writer_declare(w, t->name, t->dtype, t->ndim, t->shape, err);
		if (r < 0)
			goto fail;
		last++;
	}
	r = moe_st_writer_begin(w, err);
	if (r < 0)
		goto fail;
	r = pipe_start(&pp, w, buf, err);
	if (r < 0)
		goto fail;
	for (size_t i = first; i < last && r == 0; i++) {
		const struct gen_tensor *t = &p->t[i];
		size_t esz = moe_dtype_size(t->dtype);

		if (t->fill == FILL_FP8 || t->fill == FILL_FP8_SCALE) {
			r = write_fp8(p, t, seed, &pp, &slot, done, progress, ctx, err);
			continue;
		}
		if (t->fill == FILL_MXFP4 || t->fill == FILL_MXFP4_SCALE) {
			r = write_mxfp4(p, t, seed, &pp, &slot, done, progress, ctx, err);
			continue;
		}
		if (t->fill == FILL_Q4) {
			r = write_q4(d, t, seed, q4, &pp, &slot, done, p->total, progress, ctx, err);
			continue;
		}
		{
		/* A power of two per chunk: no chunk crosses 2^32 elements. */
		uint64_t per = GEN_CHUNK / esz, n_elem = t->nbytes / esz;
		uint64_t key = gen_tensor_key(seed, t->name);

		for (uint64_t e = 0; e < n_elem; e += per) {
			size_t cnt = (size_t)(n_elem - e < per ? n_elem - e : per);
			void *b = pipe_get(&pp, slot);

			if (!b) {
				r = -EIO;        /* the real error comes from pipe_stop */
				break;
			}
			gen_values(t, key, e, cnt, b);
			pipe_put(&pp, slot, cnt * esz);
			slot ^= 1;
			*done += (uint64_t)cnt * esz;
			if (progress)
				progress(ctx, *done, p->total);
		}
		}
	}
	r = pipe_stop(&pp, err);
	if (r < 0)
		goto fail;
	*pos = last;
	return moe_st_writer_finish(w, err);
fail:
	moe_st_writer_abort(w);
	return r;
}

static int write_index(const struct gen_plan *p, const char *dir, struct moe_err *err)
{
	json_t *root, *wm;
	char name[64];
	int r;

	wm = json_object();
	root = json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)p->total, "weight_map", wm);
	if (!root)
		return moe_err_set(err, -ENOMEM, "out of memory");
	for (size_t i = 0; i < p->n; i++) {
		shard_name(name, sizeof(name), p->t[i].shard, p->n_shards);
		if (json_object_set_new(wm, p->t[i].name, json_string(name)) < 0) {
			json_decref(root);
			return moe_err_set(err, -ENOMEM, "out of memory");
		}
	}
	r = write_json(dir, "model.safetensors.index.json", root, err);
	json_decref(root);
	return r;
}

int moe_gen_model(const struct moe_gen_options *opt, const char *dir,
		  void (*progress)(void *ctx, uint64_t done, uint64_t total), void *ctx,
		  struct moe_err *err)
{
	struct gen_dims d;
	struct gen_plan plan;
	struct gen_q4 q4 = { 0 };
	json_t *cfg;
	void *buf[2];
	uint64_t done = 0;
	size_t pos = 0;
	int r;

	r = gen_resolve(opt, &d, err);
	if (r < 0)
		return r;
	r = mkdir_p(dir, err);
	if (r < 0)
		return r;
	r = remove_old(dir, err);
	if (r < 0)
		return r;
	cfg = config_json(&d);
	if (!cfg)
		return moe_err_set(err, -ENOMEM, "out of memory");
	r = write_json(dir, "config.json", cfg, err);
	json_decref(cfg);
	if (r < 0)
		return r;
	r = gen_plan_build(&plan, &d, err);
	if (r < 0)
		return r;
	r = gen_plan_skew(&plan, &d, opt->seed, err);
	if (r < 0) {
		gen_plan_free(&plan);
		return r;
	}
	buf[0] = malloc(GEN_CHUNK);
	buf[1] = malloc(GEN_CHUNK);
	if (!buf[0] || !buf[1])
		r = moe_err_set(err, -ENOMEM, "out of memory");
	for (uint32_t s = 0; s < plan.n_shards && r >= 0; s++)
		r = write_shard(&plan, &d, opt->seed, dir, s, &pos, buf, &q4, &done, progress, ctx, err);
	gen_q4_free(&q4);
	if (r >= 0 && plan.n_shards > 1)
		r = write_index(&plan, dir, err);
	free(buf[0]);
	free(buf[1]);
	gen_plan_free(&plan);
	return r < 0 ? r : 0;
}
