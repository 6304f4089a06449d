/* SPDX-License-Identifier: MIT */
/*
 * moectl pack, inspect, verify: the .moe store commands (moe-store(5)).
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "moectl.h"
#include "formats/pack.h"
#include "engine/store.h"


static void human_size(char *buf, size_t len, uint64_t n)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB" };
	double v = (double)n;
	int u = 0;

	while (v >= 1024 && u < 5) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%" PRIu64 " B", n);
	else
		snprintf(buf, len, "%.1f %s", v, units[u]);
}

/* --- pack ------------------------------------------------------------------- */

static void pack_usage(FILE *f)
{
	fputs("usage: moectl pack HF_DIR -o STORE [--dtype bf16|f16|f32 |\n"
	      "                                    --quantize fp8 [--quantize-skip NAME,...]]\n"
	      "\n"
	      "Pack the MoE layers of the Hugging Face checkpoint in HF_DIR (config.json and\n"
	      "model.safetensors or its shards) into the .moe store STORE (see moe-store(5)).\n"
	      "\n"
	      "  -o, --output STORE   the store to write (written under a temporary name\n"
	      "                       in its directory, then renamed into place)\n"
	      "  --dtype DTYPE        convert the expert weights to bf16, f16 or f32, FP8\n"
	      "                       ones dequantized (default: keep the checkpoint's\n"
	      "                       dtype, FP8 included)\n"
	      "  --quantize fp8       quantize bf16/f16/f32 expert weights, routed and shared,\n"
	      "                       to FP8 e4m3 with a float32 scale per 128x128 block\n"
	      "                       (max |w| / 448), as DeepSeek-V3 is released: half the\n"
	      "                       bytes of bf16; routers and biases stay float32\n"
	      "  --quantize-skip NAME[,NAME...]\n"
	      "                       with --quantize: leave these in the checkpoint's dtype:\n"
	      "                       'shared' (the shared expert), 'routed', or parts of\n"
	      "                       tensor names as in a release's modules_to_not_convert\n"
	      "                       (mlp.shared_experts); may be repeated\n"
	      "  -h, --help           show this help\n", f);
}

static void pack_progress(void *ctx, uint64_t done, uint64_t total, const char *what)
{
	static bool stalled;
	const char *stall;

	(void)what;
	moectl_progress(ctx, done, total);
	/* For tests/cli_pack.sh: stop mid-store, so that a test can send a
	 * signal to a pack that has written part of its output. */
	stall = getenv("MOECTL_PACK_TEST_STALL");
	if (stall && !stalled && done > 0 && done < total) {
		stalled = true;
		fprintf(stderr, "moectl: pack: stalled for a test\n");
		sleep((unsigned)atoi(stall));
	}
}

/* The rest of pack, options parsed. */
static int pack_run(const char *dir, const char *out, struct moe_pack_options *po, int argc, char **argv)
{
	struct moectl_progress prog;
	struct moe_err err = { 0 };
	struct moe_store *s = NULL;
	char size[32], why[8192];
	uint8_t fp[16];
	double t0;
	int fr;

	if (optind < argc)
		return moectl_usage("pack", "unexpected argument '%s'", argv[optind]);
	if (!dir)
		return moectl_usage("pack", "missing HF_DIR");
	if (!out)
		return moectl_usage("pack", "missing -o STORE");
	if (po->dtype >= 0 && po->quantize)
		return moectl_fail("pack: --quantize and --dtype cannot be combined "
				   "(--quantize fp8 chooses the store's dtype)");

	/* the checkpoint's fingerprint, for the store to say what it was packed
	 * from; one that cannot be taken leaves none and a warning, unless pack
	 * fails too (then its message, which names the file, is the one) */
	fr = moectl_fingerprint_raw(dir, fp);
	if (fr == 0)
		po->source_fingerprint = fp;
	moectl_progress_init(&prog, "pack");
	po->progress = pack_progress;
	po->ctx = &prog;
	t0 = moectl_now();
	if (moe_pack(dir, out, po, &err) < 0) {
		moectl_progress_done(&prog);
		return moectl_fail_err(&err);
	}
	moectl_progress_done(&prog);
	if (fr < 0) {
		moectl_fingerprint_why(dir, fr, why, sizeof(why));
		fprintf(stderr, "moectl: warning: pack: no fingerprint recorded in %s: %s; a client "
			"cannot check that it loads the checkpoint moed serves\n", out, why);
	}
	if (moe_store_open(out, &s, &err) < 0)
		return moectl_fail_err(&err);
	human_size(size, sizeof(size), s->hdr.file_size);
	printf("packed %" PRIu32 " MoE layers x %" PRIu32 " experts%s (%s%s%s) into %s: %s in %.2f s\n",
	       s->hdr.num_moe_layers, s->cfg.num_experts,
	       s->cfg.shared_intermediate_size ? " + shared" : "",
	       moe_dtype_name(s->cfg.weight_dtype),
	       s->cfg.shared_intermediate_size && s->cfg.shared_dtype != s->cfg.weight_dtype ? ", shared " : "",
	       s->cfg.shared_intermediate_size && s->cfg.shared_dtype != s->cfg.weight_dtype ?
	       moe_dtype_name(s->cfg.shared_dtype) : "", out, size, moectl_now() - t0);
	moe_store_close(s);
	return 0;
}

int cmd_pack(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "dtype", required_argument, NULL, 'd' },
		{ "quantize", required_argument, NULL, 'q' },
		{ "quantize-skip", required_argument, NULL, 'k' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct moe_pack_options po = { .dtype = -1 };
	const char *out = NULL, *dir;
	char *skip = NULL;
	int c, r;

	optind = 1;
	opterr = 0;
	/* GNU getopt permutes: options may come before or after HF_DIR */
	while ((c = getopt_long(argc, argv, ":ho:", opts, NULL)) != -1) {
		switch (c) {
		case 'o':
			out = optarg;
			break;
		case 'd': {
			enum moe_dtype t;

			if (moe_dtype_parse(optarg, &t) < 0)
				return free(skip), moectl_fail("pack: --dtype: '%s' is not one of bf16, f16, f32",
							       optarg);
			po.dtype = (int)t;
			break;
		}
		case 'q':
			if (strcmp(optarg, "fp8") != 0)
				return free(skip), moectl_fail("pack: --quantize: '%s' is not supported "
							       "(supported: fp8)", optarg);
			po.quantize = optarg;
			break;
		case 'k': {
			/* repeated: one list */
			char *s2;

			if (asprintf(&s2, "%s%s%s", skip ? skip : "", skip ? "," : "", optarg) < 0) {
				free(skip);
				return moectl_failx(MOECTL_INTERNAL, "pack: out of memory");
			}
			free(skip);
			skip = s2;
			break;
		}
		case 'h':
			pack_usage(stdout);
			return free(skip), 0;
		default:
			return free(skip), moectl_getopt_error("pack", c, argc, argv, opts);
		}
	}
	po.quantize_skip = skip;
	dir = optind < argc ? argv[optind++] : NULL;
	r = pack_run(dir, out, &po, argc, argv);
	free(skip);
	return r;
}

/* --- inspect ------------------------------------------------------------------ */

static const char *scoring_name(enum moe_scoring s)
{
	return s == MOE_SCORING_SIGMOID ? "sigmoid" : "softmax";
}

static const char *topk_method_name(enum moe_topk_method t)
{
	switch (t) {
	case MOE_TOPK_GREEDY: return "greedy";
	case MOE_TOPK_GROUP_LIMITED: return "group_limited_greedy";
	case MOE_TOPK_NOAUX_TC: return "noaux_tc";
	}
	return "?";
}

/* "1-3, 5, 7-9" */
static void layer_ranges(const struct moe_store *s, char *buf, size_t len)
{
	size_t o = 0;

	buf[0] = '\0';
	for (uint32_t i = 0; i < s->hdr.num_moe_layers && o < len;) {
		uint32_t j = i;

		while (j + 1 < s->hdr.num_moe_layers && s->layers[j + 1].layer == s->layers[j].layer + 1)
			j++;
		if (j == i)
			o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu32, i ? ", " : "", s->layers[i].layer);
		else
			o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu32 "-%" PRIu32, i ? ", " : "",
					      s->layers[i].layer, s->layers[j].layer);
		i = j + 1;
	}
}

struct sizes {
	uint64_t experts, routers, shared;
};

/* The bits per weight of an FFN's matrices of dtype @dt and intermediate
 * size @I (a routed expert's or the shared one's): their bytes in the blob
 * (codes, scales and padding; not gpt_oss's float32 biases, which are no
 * weights of a matrix) over their weights.  bf16: 16; MXFP4 at gpt-oss's
 * shapes: 4.25; FP8 at DeepSeek's: 8.002. */
static double ffn_bits_per_weight(const struct moe_model_config *c, enum moe_dtype dt, uint32_t I)
{
	uint64_t H = c->hidden_size, weights = (uint64_t)(c->gated ? 3 : 2) * H * I;
	uint64_t bytes = (c->gated ? 2 : 1) * moe_cfg_matrix_bytes(c, dt, I, H) +
			 moe_cfg_matrix_bytes(c, dt, H, I);

	return weights ? 8.0 * (double)bytes / (double)weights : 0.0;
}

static bool has_int4(const struct moe_model_config *c)
{
	return c->weight_dtype == MOE_DTYPE_INT4 ||
	       (c->shared_intermediate_size && c->shared_dtype == MOE_DTYPE_INT4);
}

static void store_sizes(const struct moe_store *s, struct sizes *z)
{
	memset(z, 0, sizeof(*z));
	for (uint32_t i = 0; i < s->hdr.num_moe_layers; i++) {
		z->routers += s->layers[i].router_bytes;
		z->shared += s->layers[i].shared_bytes;
		z->experts += s->hdr.expert_stride * s->cfg.num_experts;
	}
}

/* The shortest decimal that reads back as @f: 0.1f prints as 0.1, not as
 * 0.10000000149011612. */
static double float_for_json(float f)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%.9g", (double)f);
	for (int prec = 1; prec <= 9; prec++) {
		snprintf(buf, sizeof(buf), "%.*g", prec, (double)f);
		if ((float)strtod(buf, NULL) == f)
			break;
	}
	return strtod(buf, NULL);
}

static int inspect_json(const char *path, const struct moe_store *s)
{
	const struct moe_model_config *c = &s->cfg;
	const struct moe_store_header *h = &s->hdr;
	json_t *root, *layers, *layout, *sizes;
	struct sizes z;
	char *text, fp[33];

	store_sizes(s, &z);
	layers = json_array();
	layout = json_array();
	for (uint32_t i = 0; layers && layout && i < h->num_moe_layers; i++) {
		const struct moe_store_layer *l = &s->layers[i];

		json_array_append_new(layers, json_integer(l->layer));
		/* where each part lies, for tools and tests that read the file */
		json_array_append_new(layout, json_pack("{s:I,s:I,s:I,s:I,s:I,s:I}",
			"layer", (json_int_t)l->layer,
			"router_offset", (json_int_t)l->router_offset,
			"router_bytes", (json_int_t)l->router_bytes,
			"shared_offset", (json_int_t)l->shared_offset,
			"shared_bytes", (json_int_t)l->shared_bytes,
			"experts_offset", (json_int_t)l->experts_offset));
	}
	sizes = json_pack("{s:I,s:I,s:I,s:I}", "file", (json_int_t)h->file_size,
			  "experts", (json_int_t)z.experts, "routers", (json_int_t)z.routers,
			  "shared", (json_int_t)z.shared);
	root = json_pack("{s:s,s:i,s:s,s:s,s:s,"
			 "s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,"
			 "s:s,s:s,s:b,s:f,s:b,s:b,s:b,s:s,s:s,s:s,"
			 "s:o,s:o,s:I,s:I,s:I,s:f,s:I,s:f,s:o}",
			 "path", path, "version", (int)h->version, "model_type", h->model_type,
			 "source", h->source, "source_dtype", h->source_dtype,
			 "hidden_size", (json_int_t)c->hidden_size,
			 "moe_intermediate_size", (json_int_t)c->moe_intermediate_size,
			 "num_experts", (json_int_t)c->num_experts,
			 "top_k", (json_int_t)c->top_k,
			 "num_hidden_layers", (json_int_t)c->num_hidden_layers,
			 "n_group", (json_int_t)c->n_group,
			 "topk_group", (json_int_t)c->topk_group,
			 "n_shared_experts", (json_int_t)c->n_shared_experts,
			 "shared_intermediate_size", (json_int_t)c->shared_intermediate_size,
			 "scoring", scoring_name(c->scoring),
			 "topk_method", topk_method_name(c->topk_method),
			 "norm_topk_prob", (int)c->norm_topk_prob,
			 "routed_scaling_factor", float_for_json(c->routed_scaling_factor),
			 "has_bias", (int)c->has_bias,
			 "shared_gate", (int)c->shared_gate,
			 "gated", (int)c->gated,
			 "act", moe_act_name(c->act),
			 "weight_dtype", moe_dtype_name(c->weight_dtype),
			 "shared_dtype", c->shared_intermediate_size ? moe_dtype_name(c->shared_dtype) : "",
			 "moe_layers", layers,
			 "layers", layout,
			 "expert_bytes", (json_int_t)h->expert_bytes,
			 "expert_stride", (json_int_t)h->expert_stride,
			 "expert_align", (json_int_t)h->expert_align,
			 "expert_bits_per_weight",
			 ffn_bits_per_weight(c, c->weight_dtype, c->moe_intermediate_size),
			 "shared_bytes", (json_int_t)moe_shared_bytes(c),
			 "shared_bits_per_weight",
			 ffn_bits_per_weight(c, c->shared_dtype, c->shared_intermediate_size),
			 "sizes", sizes);
	if (!root)
		return moectl_failx(MOECTL_INTERNAL, "inspect: out of memory");
	/* null: the store records none (packed before fingerprints) */
	json_object_set_new(root, "fingerprint", moectl_fingerprint_hex(h->source_fingerprint, fp) ?
			    json_string(fp) : json_null());
	if (has_int4(c))       /* int4 stores only, so other stores print what they did */
		json_object_set_new(root, "int4", json_pack("{s:I,s:b,s:b,s:s}",
			"group_size", (json_int_t)c->q4_group, "zero_points", (c->q4_flags & MOE_Q4_ZEROS) != 0,
			"act_order", (c->q4_flags & MOE_Q4_PERM) != 0,
			"scales", c->q4_flags & MOE_Q4_BF16_SCALES ? "bf16" : "f16"));
	if (c->has_expert_bias || c->act == MOE_ACT_SWIGLU_OAI) {
		/* gpt_oss only, so other stores print what they did */
		json_object_set_new(root, "has_expert_bias", json_boolean(c->has_expert_bias));
		json_object_set_new(root, "swiglu_alpha", json_real(float_for_json(c->swiglu_alpha)));
		json_object_set_new(root, "swiglu_limit", json_real(float_for_json(c->swiglu_limit)));
	}
	text = json_dumps(root, MOECTL_JSON_FLAGS);
	json_decref(root);
	if (!text)
		return moectl_failx(MOECTL_INTERNAL, "inspect: out of memory");
	puts(text);
	free(text);
	return 0;
}

static void inspect_text(const char *path, const struct moe_store *s)
{
	const struct moe_model_config *c = &s->cfg;
	const struct moe_store_header *h = &s->hdr;
	char a[32], b[32], d[32], e[32], ranges[4096], fp[33];
	struct sizes z;

	store_sizes(s, &z);
	human_size(a, sizeof(a), h->file_size);
	printf("store:        %s (format version %" PRIu32 ", %s)\n", path, h->version, a);
	printf("model_type:   %s\n", h->model_type);
	printf("source:       %s (%s)\n", h->source[0] ? h->source : "?",
	       h->source_dtype[0] ? h->source_dtype : "?");
	printf("fingerprint:  %s\n", moectl_fingerprint_hex(h->source_fingerprint, fp) ? fp : "none");
	printf("hidden_size:  %" PRIu32 "\n", c->hidden_size);
	printf("experts:      %" PRIu32 " routed, top %" PRIu32 ", intermediate %" PRIu32 "\n",
	       c->num_experts, c->top_k, c->moe_intermediate_size);
	if (c->shared_intermediate_size)
		printf("shared:       %" PRIu32 " expert%s, intermediate %" PRIu32 "%s\n", c->n_shared_experts,
		       c->n_shared_experts == 1 ? "" : "s", c->shared_intermediate_size,
		       c->shared_gate ? ", sigmoid gate" : "");
	else
		printf("shared:       none\n");
	printf("expert FFN:   %s%s", c->gated ? "gated " : "plain ", moe_act_name(c->act));
	if (c->act == MOE_ACT_SWIGLU_OAI)
		printf(" (alpha %g, limit %g)", (double)c->swiglu_alpha, (double)c->swiglu_limit);
	printf("%s, %s\n", c->has_expert_bias ? ", biases" : "", moe_dtype_name(c->weight_dtype));
	if (c->arch == MOE_ARCH_GPT_OSS) {
		printf("routing:      logits + router bias, top-k, softmax of the k\n");
	} else {
		printf("routing:      %s, %s", scoring_name(c->scoring), topk_method_name(c->topk_method));
		if (c->n_group > 1)
			printf(" (%" PRIu32 " groups, keep %" PRIu32 ")", c->n_group, c->topk_group);
		if (c->has_bias)
			printf(", correction bias");
		printf(", norm_topk_prob %s, routed_scaling_factor %g\n", c->norm_topk_prob ? "true" : "false",
		       (double)c->routed_scaling_factor);
	}
	layer_ranges(s, ranges, sizeof(ranges));
	printf("layers:       %" PRIu32 " MoE of %" PRIu32 ": %s\n", h->num_moe_layers,
	       c->num_hidden_layers, ranges);
	printf("expert blob:  %" PRIu64 " bytes, stride %" PRIu64 ", aligned to %" PRIu64
	       "; %s, %.3f bits/weight\n", h->expert_bytes, h->expert_stride, h->expert_align,
	       moe_dtype_name(c->weight_dtype),
	       ffn_bits_per_weight(c, c->weight_dtype, c->moe_intermediate_size));
	if (c->shared_intermediate_size)
		printf("shared blob:  %" PRIu64 " bytes; %s, %.3f bits/weight\n", moe_shared_bytes(c),
		       moe_dtype_name(c->shared_dtype),
		       ffn_bits_per_weight(c, c->shared_dtype, c->shared_intermediate_size));
	if (has_int4(c)) {
		char g[32] = "one per row";

		if (c->q4_group)
			snprintf(g, sizeof(g), "%" PRIu32, c->q4_group);
		printf("int4:         group %s, %s, %s scales%s\n", g,
		       c->q4_flags & MOE_Q4_ZEROS ? "zero points" : "symmetric (zero 8)",
		       c->q4_flags & MOE_Q4_BF16_SCALES ? "bf16" : "f16",
		       c->q4_flags & MOE_Q4_PERM ? ", act-order permutation" : "");
	}
	human_size(a, sizeof(a), z.experts);
	human_size(b, sizeof(b), z.routers);
	human_size(d, sizeof(d), z.shared);
	human_size(e, sizeof(e), h->file_size);
	printf("sizes:        experts %s, routers %s, shared %s, file %s\n", a, b, d, e);
}

static void inspect_usage(FILE *f)
{
	fputs("usage: moectl inspect STORE [--json]\n"
	      "\n"
	      "Describe the .moe store STORE: model, shapes, routing rule, dtype, MoE layers,\n"
	      "expert blob layout and sizes.  The header and tables are checked; the blobs\n"
	      "are not (moectl verify checks them).\n"
	      "\n"
	      "  --json      print a JSON object instead\n"
	      "  -h, --help  show this help\n", f);
}

/* Shared by inspect and verify: STORE and flags in any order. */
static int parse_store_args(const char *cmd, int argc, char **argv, bool allow_json,
			    const char **ret_path, bool *ret_json, void (*usage)(FILE *))
{
	const char *path = NULL;
	bool json = false;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else if (allow_json && !strcmp(argv[i], "--json")) {
			json = true;
		} else if (!strcmp(argv[i], "--")) {
			if (i + 1 < argc && !path)
				path = argv[++i];
		} else if (argv[i][0] == '-') {
			return moectl_unknown(cmd, "option", argv[i],
					      (const char *const[]){ "help", "json" }, allow_json ? 2 : 1);
		} else if (path) {
			return moectl_usage(cmd, "unexpected argument '%s'", argv[i]);
		} else {
			path = argv[i];
		}
	}
	if (!path)
		return moectl_usage(cmd, "missing STORE");
	*ret_path = path;
	*ret_json = json;
	return -1;      /* go on */
}

int cmd_inspect(int argc, char **argv)
{
	struct moe_err err = { 0 };
	struct moe_store *s;
	const char *path = NULL;
	bool json = false;
	int r;

	r = parse_store_args("inspect", argc, argv, true, &path, &json, inspect_usage);
	if (r >= 0)
		return r;
	if (moe_store_open(path, &s, &err) < 0)
		return moectl_fail_err(&err);
	if (json)
		r = inspect_json(path, s);
	else
		inspect_text(path, s), r = 0;
	moe_store_close(s);
	if (fflush(stdout) != 0 && r == 0)
		r = moectl_fail("inspect: writing to stdout failed");
	return r;
}

/* --- verify ------------------------------------------------------------------- */

static void verify_usage(FILE *f)
{
	fputs("usage: moectl verify STORE\n"
	      "\n"
	      "Check every checksum of the .moe store STORE: header, tables, every router\n"
	      "region, shared expert and expert blob.  Prints \"OK: N blobs verified\", or one\n"
	      "line per bad blob on stderr and exits with status 5.\n"
	      "\n"
	      "  -h, --help  show this help\n", f);
}

struct verify_ctx {
	struct moectl_progress prog;
	int n_bad;
};

static void verify_bad(void *ctx, const char *msg)
{
	struct verify_ctx *v = ctx;

	if (v->prog.tty && v->prog.last_pct >= 0)
		fputc('\n', stderr);       /* leave the bar's line */
	v->prog.last_pct = -1;
	moectl_fail("%s", msg);
	v->n_bad++;
}

static void verify_progress(void *ctx, uint64_t done, uint64_t total)
{
	struct verify_ctx *v = ctx;

	moectl_progress(&v->prog, done, total);
}

int cmd_verify(int argc, char **argv)
{
	struct moe_err err = { 0 };
	struct verify_ctx v;
	struct moe_store *s;
	const char *path = NULL;
	bool json;
	int r;

	r = parse_store_args("verify", argc, argv, false, &path, &json, verify_usage);
	if (r >= 0)
		return r;
	if (moe_store_open(path, &s, &err) < 0)
		return moectl_fail_err(&err);
	memset(&v, 0, sizeof(v));
	moectl_progress_init(&v.prog, "verify");
	r = moe_store_verify(s, verify_bad, verify_progress, &v, &err);
	moectl_progress_done(&v.prog);
	if (r < 0) {
		moe_store_close(s);
		return moectl_fail_err(&err);
	}
	if (r == 0)
		printf("OK: %" PRIu64 " blobs verified\n", moe_store_blob_count(s));
	moe_store_close(s);
	return r == 0 ? 0 : MOECTL_IO;
}
