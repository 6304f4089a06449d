/* SPDX-License-Identifier: MIT */
/*
 * moectl forward: run one MoE layer on a batch read from an .npy file.
 *
 * With --model STORE the layer runs in this process through the engine
 * (the same code moed uses); through the daemon comes with the daemon.
 * The input is float32 [T,H] or [B,S,H] (bfloat16 with --dtype bf16); the
 * output has the input's shape and dtype.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "engine/dtype.h"
#include "engine/engine.h"
#include "libmoeclient/moeclient.h"
#include "moectl.h"
#include "formats/npy.h"
#include "engine/rng.h"

#define FWD_MAX_REPEAT 1000000u
#define FWD_MAX_RANDOM_TOKENS (1u << 24)  /* --random-input: 16M tokens is plenty */
#define FWD_HIST_WIDTH 30                  /* characters of the longest bar */
#define FWD_HIST_ALL_MAX 64                /* show every expert up to this many */
#define FWD_HIST_TOP 32                    /* otherwise the busiest this many */

static void usage(FILE *f)
{
	fputs("usage: moectl forward --model STORE --layer L (--input IN.npy | --random-input T)\n"
	      "                      [--output OUT.npy] [options]\n"
	      "\n"
	      "Run MoE layer L (the checkpoint's layer number) on a batch of hidden states.\n"
	      "The input is float32 of shape [T,H] or [B,S,H] with H the model's hidden size;\n"
	      "the output has the same shape and dtype.\n"
	      "\n"
	      "  --model STORE        run in this process on a .moe store; without it the\n"
	      "                       layer runs in moed (moectl --socket PATH, $MOED_SOCKET)\n"
	      "  --layer L            the MoE layer to run\n"
	      "  --input IN.npy       the hidden states\n"
	      "  --random-input T     instead of --input: T tokens uniform in [-1, 1)\n"
	      "                       from a fixed generator (see --seed), shape [T,H]\n"
	      "  --seed N             seed of --random-input (default 1)\n"
	      "  --save-input IN.npy  with --random-input, also write the input it made\n"
	      "  --output OUT.npy     where to write the result\n"
	      "  --dtype f32|bf16     activation dtype (default f32); bf16 input and output\n"
	      "                       are raw bfloat16 words ('<u2'), computed in float32\n"
	      "  --routing-out R.npz  save the routing: \"ids\" int32 [T,k], \"weights\" float32 [T,k]\n"
	      "  --threads N          CPU threads (default: one per online CPU)\n"
	      "  --backend B          auto, cpu or cuda (default auto)\n"
	      "  --repeat N           run the layer N times (timing; the output is the last run's)\n"
	      "  --fresh-input        with --random-input and --repeat, a new batch every run\n"
	      "                       (seeds N, N+1, ...), as a cache sees in service\n"
	      "  --stats              print throughput and the per-expert load on stdout\n"
	      "  --top N              with --stats, show only the N busiest experts\n"
	      "  --all-experts        every expert for every token with weight 1/E: the dense\n"
	      "                       comparison for timing; the output is not the model's\n"
	      "\n"
	      "Expert cache and paging (see moed.conf(5) for the same settings in moed):\n"
	      "  --layer all          every MoE layer in order, each one's input the previous\n"
	      "                       input plus its output (a residual stream); the output is\n"
	      "                       the last layer's input plus its output\n"
	      "  --host-cache-mb N    host budget for weights (routers, shared experts and the\n"
	      "                       routed-expert cache); default: no limit\n"
	      "  --gpu-cache-mb N     device tier of the CUDA backend (default: all free device\n"
	      "                       memory minus a reserve)\n"
	      "  --policy P           eviction policy: auto (= freq), freq or lru\n"
	      "  --pin L:E            keep expert E (or * for all) of layer L resident;\n"
	      "                       repeatable\n"
	      "  --pin-hot N          keep the N experts with the most load so far resident\n"
	      "  --prefetch           after routing layer L, predict layer L+1's experts with\n"
	      "                       its router and read them ahead\n"
	      "  --queue-depth N      pager reads in flight (default 32)\n"
	      "  --chunk-kb N         pager read size in KiB (default 1024)\n"
	      "  --trace-out FILE     record the experts each batch uses (moe-trace(5))\n"
	      "  --stats-json FILE    write the cache and pager figures as JSON (- for stdout)\n"
	      "  --inject-fault KIND:L:E[:N]\n"
	      "                       testing: fail the next N (default 1) reads of expert E\n"
	      "                       of layer L; KIND io, short (a short read, then the\n"
	      "                       end of the file) or checksum\n"
	      "  -h, --help           this text\n"
	      "\n"
	      "At least one of --output, --routing-out, --stats or --save-input is needed.\n", f);
}

struct fwd_args {
	const char *model;
	const char *input;
	const char *output;
	const char *routing_out;
	const char *save_input;
	const char *backend;
	uint64_t layer;
	uint64_t random_tokens;
	uint64_t seed;
	uint64_t threads;
	uint64_t repeat;
	uint64_t top;
	bool have_layer;
	bool have_random;
	bool bf16;
	bool stats;
	bool all_experts;
	bool all_layers;
	bool prefetch;
	bool fresh;
	uint64_t host_mb;
	uint64_t gpu_mb;
	uint64_t pin_hot;
	uint64_t queue_depth;
	uint64_t chunk_kb;
	const char *policy;
	const char *trace_out;
	const char *stats_json;
	const char *pins[257];
	uint32_t npins;
	enum moe_pager_fault fault;
	uint64_t fault_layer, fault_expert, fault_count;
};

enum {
	OPT_MODEL = 256, OPT_LAYER, OPT_INPUT, OPT_RANDOM, OPT_SEED, OPT_SAVE_INPUT, OPT_OUTPUT, OPT_DTYPE,
	OPT_ROUTING, OPT_THREADS, OPT_BACKEND, OPT_REPEAT, OPT_STATS, OPT_TOP, OPT_ALL,
	OPT_HOST_MB, OPT_GPU_MB, OPT_POLICY, OPT_PIN, OPT_PIN_HOT, OPT_PREFETCH, OPT_QD, OPT_CHUNK, OPT_TRACE,
	OPT_FAULT, OPT_FRESH, OPT_STATS_JSON,
};

static const struct option long_opts[] = {
	{ "model", required_argument, NULL, OPT_MODEL },
	{ "layer", required_argument, NULL, OPT_LAYER },
	{ "input", required_argument, NULL, OPT_INPUT },
	{ "random-input", required_argument, NULL, OPT_RANDOM },
	{ "seed", required_argument, NULL, OPT_SEED },
	{ "save-input", required_argument, NULL, OPT_SAVE_INPUT },
	{ "output", required_argument, NULL, OPT_OUTPUT },
	{ "dtype", required_argument, NULL, OPT_DTYPE },
	{ "routing-out", required_argument, NULL, OPT_ROUTING },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "backend", required_argument, NULL, OPT_BACKEND },
	{ "repeat", required_argument, NULL, OPT_REPEAT },
	{ "stats", no_argument, NULL, OPT_STATS },
	{ "top", required_argument, NULL, OPT_TOP },
	{ "all-experts", no_argument, NULL, OPT_ALL },
	{ "host-cache-mb", required_argument, NULL, OPT_HOST_MB },
	{ "gpu-cache-mb", required_argument, NULL, OPT_GPU_MB },
	{ "policy", required_argument, NULL, OPT_POLICY },
	{ "pin", required_argument, NULL, OPT_PIN },
	{ "pin-hot", required_argument, NULL, OPT_PIN_HOT },
	{ "prefetch", no_argument, NULL, OPT_PREFETCH },
	{ "queue-depth", required_argument, NULL, OPT_QD },
	{ "chunk-kb", required_argument, NULL, OPT_CHUNK },
	{ "trace-out", required_argument, NULL, OPT_TRACE },
	{ "inject-fault", required_argument, NULL, OPT_FAULT },
	{ "fresh-input", no_argument, NULL, OPT_FRESH },
	{ "stats-json", required_argument, NULL, OPT_STATS_JSON },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

/* Returns 0, 1 (error, already reported) or -1 (--help: exit 0). */
static int parse_args(int argc, char **argv, struct fwd_args *a)
{
	int c;

	memset(a, 0, sizeof(*a));
	a->repeat = 1;
	a->seed = 1;
	opterr = 0;
	optind = 1;
	while ((c = getopt_long(argc, argv, "+:h", long_opts, NULL)) != -1) {
		switch (c) {
		case OPT_MODEL:
			a->model = optarg;
			break;
		case OPT_LAYER:
			if (!strcmp(optarg, "all"))
				a->all_layers = true;
			else if (moectl_parse_u64("--layer", optarg, 0, UINT32_MAX, &a->layer) < 0)
				return 1;
			a->have_layer = true;
			break;
		case OPT_GPU_MB:
			if (moectl_parse_u64("--gpu-cache-mb", optarg, 1, MOE_ENGINE_CACHE_MB_MAX, &a->gpu_mb) < 0)
				return 1;
			break;
		case OPT_HOST_MB:
			if (moectl_parse_u64("--host-cache-mb", optarg, 1, MOE_ENGINE_CACHE_MB_MAX, &a->host_mb) < 0)
				return 1;
			break;
		case OPT_POLICY:
			if (strcmp(optarg, "auto") && strcmp(optarg, "freq") && strcmp(optarg, "lru"))
				return moectl_fail("forward: --policy must be auto, freq or lru, not '%s'", optarg);
			a->policy = optarg;
			break;
		case OPT_PIN:
			if (a->npins >= 256)
				return moectl_fail("forward: more than 256 --pin options; use L:* for whole layers");
			a->pins[a->npins++] = optarg;
			break;
		case OPT_PIN_HOT:
			if (moectl_parse_u64("--pin-hot", optarg, 0, MOE_ENGINE_PIN_HOT_MAX, &a->pin_hot) < 0)
				return 1;
			break;
		case OPT_PREFETCH:
			a->prefetch = true;
			break;
		case OPT_FRESH:
			a->fresh = true;
			break;
		case OPT_STATS_JSON:
			a->stats_json = optarg;
			break;
		case OPT_QD:
			if (moectl_parse_u64("--queue-depth", optarg, MOE_PAGER_QUEUE_DEPTH_MIN,
					     MOE_PAGER_QUEUE_DEPTH_MAX, &a->queue_depth) < 0)
				return 1;
			break;
		case OPT_CHUNK:
			if (moectl_parse_u64("--chunk-kb", optarg, MOE_PAGER_CHUNK_KB_MIN, MOE_PAGER_CHUNK_KB_MAX,
					     &a->chunk_kb) < 0)
				return 1;
			if (a->chunk_kb % 4)
				return moectl_fail("forward: --chunk-kb must be a multiple of 4, not %" PRIu64,
						   a->chunk_kb);
			break;
		case OPT_TRACE:
			a->trace_out = optarg;
			break;
		case OPT_FAULT: {
			char kind[16];
			unsigned long long l, x, cnt = 1;
			int got = sscanf(optarg, "%15[a-z]:%llu:%llu:%llu", kind, &l, &x, &cnt);

			if (got < 3 || (strcmp(kind, "io") && strcmp(kind, "checksum") && strcmp(kind, "short")) ||
			    l > UINT32_MAX || x > UINT32_MAX || cnt == 0 || cnt > UINT32_MAX)
				return moectl_fail("forward: --inject-fault wants io:L:E[:N], short:L:E[:N] or "
						   "checksum:L:E[:N], not '%s'", optarg);
			a->fault = !strcmp(kind, "io") ? MOE_FAULT_IO : !strcmp(kind, "short") ? MOE_FAULT_SHORT
											 : MOE_FAULT_CHECKSUM;
			a->fault_layer = l;
			a->fault_expert = x;
			a->fault_count = cnt;
			break;
		}
		case OPT_INPUT:
			a->input = optarg;
			break;
		case OPT_RANDOM:
			if (moectl_parse_u64("--random-input", optarg, 1, FWD_MAX_RANDOM_TOKENS,
					     &a->random_tokens) < 0)
				return 1;
			a->have_random = true;
			break;
		case OPT_SEED:
			if (moectl_parse_u64("--seed", optarg, 0, UINT64_MAX, &a->seed) < 0)
				return 1;
			break;
		case OPT_SAVE_INPUT:
			a->save_input = optarg;
			break;
		case OPT_OUTPUT:
			a->output = optarg;
			break;
		case OPT_DTYPE:
			if (!strcmp(optarg, "f32") || !strcmp(optarg, "float32"))
				a->bf16 = false;
			else if (!strcmp(optarg, "bf16") || !strcmp(optarg, "bfloat16"))
				a->bf16 = true;
			else
				return moectl_fail("forward: --dtype must be f32 or bf16, not '%s'", optarg);
			break;
		case OPT_ROUTING:
			a->routing_out = optarg;
			break;
		case OPT_THREADS:
			if (moectl_parse_u64("--threads", optarg, 1, MOE_ENGINE_THREADS_MAX, &a->threads) < 0)
				return 1;
			break;
		case OPT_BACKEND:
			if (strcmp(optarg, "auto") && strcmp(optarg, "cpu") && strcmp(optarg, "cuda"))
				return moectl_fail("forward: --backend must be auto, cpu or cuda, not '%s'",
						   optarg);
			a->backend = optarg;
			break;
		case OPT_REPEAT:
			if (moectl_parse_u64("--repeat", optarg, 1, FWD_MAX_REPEAT, &a->repeat) < 0)
				return 1;
			break;
		case OPT_STATS:
			a->stats = true;
			break;
		case OPT_TOP:
			if (moectl_parse_u64("--top", optarg, 1, UINT32_MAX, &a->top) < 0)
				return 1;
			break;
		case OPT_ALL:
			a->all_experts = true;
			break;
		case 'h':
			usage(stdout);
			return -1;
		default:
			return moectl_getopt_error("forward", c, argc, argv, long_opts);
		}
	}
	if (optind < argc)
		return moectl_usage("forward", "unexpected argument '%s'", argv[optind]);
	if (!a->model && (a->host_mb || a->gpu_mb || a->policy || a->npins || a->pin_hot || a->prefetch || a->queue_depth ||
			  a->chunk_kb || a->trace_out || a->stats_json || a->fault || a->all_experts || a->threads ||
			  a->backend))
		return moectl_fail("forward: the cache, pager, backend and timing options go with --model; "
				   "through moed they are moed's (moed.conf(5))");
	if (!a->have_layer)
		return moectl_usage("forward", "--layer L is required");
	if (!a->input == !a->have_random)
		return moectl_usage("forward", "give exactly one of --input IN.npy and --random-input T");
	if (!a->output && !a->routing_out && !a->stats && !a->save_input && !a->stats_json)
		return moectl_fail("forward: nothing to do: give --output, --routing-out, --stats or --save-input");
	if (a->save_input && !a->have_random)
		return moectl_fail("forward: --save-input only goes with --random-input");
	if (a->routing_out && a->all_experts)
		return moectl_fail("forward: --routing-out records the model's routing; drop --all-experts");
	if (a->fresh && !a->have_random)
		return moectl_fail("forward: --fresh-input only goes with --random-input");
	if (a->all_layers && a->routing_out)
		return moectl_fail("forward: --routing-out is for one layer; drop it or give --layer L");
	return 0;
}

/* The input as float32 [T][H] plus the shape to give the output. */
struct fwd_input {
	uint32_t ndim;
	uint64_t shape[MOE_NPY_MAX_DIMS];
	uint64_t tokens;
	float *x;
};

/* @n floats uniform in [-1, 1) from @seed (bf16-representable with @bf16). */
static void random_fill(float *x, uint64_t n, uint64_t seed, bool bf16)
{
	uint64_t s = seed;

	for (uint64_t i = 0; i < n; i++) {
		/* splitmix64, top 24 bits as a uniform float in [-1, 1) */
		uint64_t z = moe_splitmix64(&s);

		x[i] = (float)((double)(z >> 40) / (double)(1u << 23) - 1.0);
		if (bf16)
			x[i] = moe_bf16_to_f32(moe_f32_to_bf16(x[i]));
	}
}

static int load_input(const struct fwd_args *a, uint32_t hidden, struct fwd_input *in)
{
	struct moe_err err = { 0 };
	struct moe_npy arr = { 0 };
	const char *want = a->bf16 ? "bfloat16" : "float32";
	uint64_t n;

	if (a->have_random) {
		in->ndim = 2;
		in->shape[0] = a->random_tokens;
		in->shape[1] = hidden;
		in->tokens = a->random_tokens;
		n = in->tokens * hidden;
		in->x = malloc(n * sizeof(float));
		if (!in->x)
			return moectl_failx(MOECTL_INTERNAL, "forward: out of memory for %" PRIu64 " input tokens", in->tokens);
		random_fill(in->x, n, a->seed, a->bf16);
		return 0;
	}

	if (moe_npy_read(a->input, &arr, &err) < 0)
		return moectl_fail_err(&err);
	if (arr.type == MOE_NPY_I32) {
		moe_npy_free(&arr);
		return moectl_fail("%s: dtype '<i4' is not supported: use float32 ('<f4') or bfloat16 (--dtype bf16)",
				   a->input);
	}
	if (arr.type == MOE_NPY_BF16 && !a->bf16) {
		moe_npy_free(&arr);
		return moectl_fail("%s: the input is bfloat16 but the activation dtype is float32: pass --dtype bf16",
				   a->input);
	}
	if (arr.type == MOE_NPY_F32 && a->bf16) {
		moe_npy_free(&arr);
		return moectl_fail("%s: the input is float32 but --dtype bf16 was given: pass a bfloat16 ('<u2') array or drop --dtype bf16",
				   a->input);
	}
	if (arr.ndim != 2 && arr.ndim != 3) {
		char dims[MOE_NPY_MAX_DIMS * 24 + 8];
		size_t len = 0;

		for (uint32_t i = 0; i < arr.ndim; i++)
			len += (size_t)snprintf(dims + len, sizeof(dims) - len, "%s%" PRIu64,
						i ? ", " : "", arr.shape[i]);
		dims[len] = '\0';
		moe_npy_free(&arr);
		return moectl_fail("%s: expected a %s array of shape [T,H] or [B,S,H], got shape (%s)",
				   a->input, want, dims);
	}
	if (arr.shape[arr.ndim - 1] != hidden) {
		uint64_t h = arr.shape[arr.ndim - 1];

		moe_npy_free(&arr);
		return moectl_fail("%s: hidden size %" PRIu64 " does not match the model's %" PRIu32,
				   a->input, h, hidden);
	}
	in->ndim = arr.ndim;
	memcpy(in->shape, arr.shape, sizeof(in->shape));
	in->tokens = arr.count / hidden;
	if (arr.type == MOE_NPY_F32) {
		in->x = arr.data;
		return 0;
	}
	n = arr.count;
	in->x = malloc((n ? n : 1) * sizeof(float));
	if (!in->x) {
		moe_npy_free(&arr);
		return moectl_failx(MOECTL_INTERNAL, "forward: out of memory for %" PRIu64 " input tokens", in->tokens);
	}
	for (uint64_t i = 0; i < n; i++)
		in->x[i] = moe_bf16_to_f32(((const uint16_t *)arr.data)[i]);
	moe_npy_free(&arr);
	return 0;
}

/* Write @n values of @data with the input's shape, in the activation dtype. */
static int write_array(const struct fwd_args *a, const char *path, const struct fwd_input *in,
		       const float *data, uint64_t n)
{
	struct moe_err err = { 0 };
	uint16_t *b;
	int r;

	if (!a->bf16)
		r = moe_npy_write(path, MOE_NPY_F32, in->ndim, in->shape, data, &err);
	else {
		b = malloc((n ? n : 1) * sizeof(*b));
		if (!b)
			return moectl_failx(MOECTL_INTERNAL, "forward: out of memory for the output");
		for (uint64_t i = 0; i < n; i++)
			b[i] = moe_f32_to_bf16(data[i]);
		r = moe_npy_write(path, MOE_NPY_BF16, in->ndim, in->shape, b, &err);
		free(b);
	}
	return r < 0 ? moectl_fail_err(&err) : 0;
}

struct load_row {
	uint32_t expert;
	uint64_t count;
};

static int by_count_desc(const void *pa, const void *pb)
{
	const struct load_row *x = pa, *y = pb;

	if (x->count != y->count)
		return x->count < y->count ? 1 : -1;
	return x->expert < y->expert ? -1 : x->expert > y->expert;
}

static void print_bar_row(uint32_t expert, int width, uint64_t count, uint64_t max, uint64_t total)
{
	int fill = max ? (int)((double)FWD_HIST_WIDTH * (double)count / (double)max + 0.5) : 0;
	char bar[FWD_HIST_WIDTH + 1];

	for (int i = 0; i < FWD_HIST_WIDTH; i++)
		bar[i] = i < fill ? '#' : ' ';
	bar[FWD_HIST_WIDTH] = '\0';
	printf("  expert %*" PRIu32 " |%s| %8" PRIu64 " %5.1f%%\n", width, expert, bar, count,
	       total ? 100.0 * (double)count / (double)total : 0.0);
}

/* The per-expert load histogram and the imbalance ratio. */
static int print_load(const struct fwd_args *a, struct moe_engine *e, uint32_t layer)
{
	const struct moe_model_config *cfg = moe_engine_config(e);
	uint32_t ne = cfg->num_experts, shown, idle = 0;
	uint64_t *counts = calloc(ne, sizeof(*counts));
	struct load_row *rows = calloc(ne, sizeof(*rows));
	uint64_t total = 0, max = 0, min = UINT64_MAX;
	bool sorted, per_run;
	int width = 1, r;

	if (!counts || !rows) {
		free(counts);
		free(rows);
		return moectl_failx(MOECTL_INTERNAL, "forward: out of memory");
	}
	r = moe_engine_expert_load(e, layer, counts);
	if (r < 0) {
		free(counts);
		free(rows);
		return moectl_fail("forward: no expert load for layer %" PRIu32 ": %s", layer,
				   strerror(-r));
	}
	for (uint32_t j = 0; j < ne; j++) {
		rows[j].expert = j;
		rows[j].count = counts[j];
		total += counts[j];
		max = counts[j] > max ? counts[j] : max;
		min = counts[j] < min ? counts[j] : min;
		idle += counts[j] == 0;
	}
	for (uint32_t v = ne ? ne - 1 : 0; v >= 10; v /= 10)
		width++;

	/* Every run routes the same tokens the same way, so the totals are
	 * multiples of the run count: show one run's load. */
	per_run = a->repeat > 1;
	for (uint32_t j = 0; per_run && j < ne; j++)
		per_run = counts[j] % a->repeat == 0;
	if (per_run) {
		for (uint32_t j = 0; j < ne; j++)
			rows[j].count /= a->repeat;
		total /= a->repeat;
		max /= a->repeat;
		min /= a->repeat;
	}

	shown = a->top ? (uint32_t)(a->top < ne ? a->top : ne)
		       : ne <= FWD_HIST_ALL_MAX ? ne : FWD_HIST_TOP;
	sorted = shown < ne;
	if (sorted)
		qsort(rows, ne, sizeof(*rows), by_count_desc);
	printf("expert load, layer %" PRIu32 " (tokens routed to each expert%s%s):\n", layer,
	       per_run ? " in one run" : a->repeat > 1 ? ", summed over the runs" : "",
	       sorted ? ", busiest first" : "");
	for (uint32_t i = 0; i < shown; i++)
		print_bar_row(rows[i].expert, width, rows[i].count, max, total);
	if (shown < ne) {
		uint64_t rest = 0, rest_max = 0, rest_min = UINT64_MAX;

		for (uint32_t i = shown; i < ne; i++) {
			rest += rows[i].count;
			rest_max = rows[i].count > rest_max ? rows[i].count : rest_max;
			rest_min = rows[i].count < rest_min ? rows[i].count : rest_min;
		}
		printf("  ... %" PRIu32 " other experts: %" PRIu64 " tokens (%.1f%%), %" PRIu64
		       " to %" PRIu64 " each\n", ne - shown, rest,
		       total ? 100.0 * (double)rest / (double)total : 0.0, rest_min, rest_max);
	}
	if (total)
		printf("imbalance: max/mean %.2f (max %" PRIu64 ", mean %.1f, min %" PRIu64
		       "; %" PRIu32 " of %" PRIu32 " experts idle)\n",
		       (double)max / ((double)total / ne), max, (double)total / ne, min, idle, ne);
	else
		printf("imbalance: no tokens routed\n");
	free(counts);
	free(rows);
	return 0;
}

/* Every MoE layer in order on a residual stream: x <- x + moe_L(x). */
static int forward_all(struct moe_engine *e, const struct fwd_input *in, float *out, unsigned flags,
		       struct moe_err *err)
{
	const struct moe_store *st = moe_engine_store(e);
	uint64_t n = in->tokens * moe_engine_config(e)->hidden_size;
	float *x = malloc((n ? n : 1) * sizeof(*x));
	int r = 0;

	if (!x)
		return moe_err_set(err, -ENOMEM, "out of memory for %" PRIu64 " tokens", in->tokens);
	memcpy(x, in->x, n * sizeof(*x));
	for (uint32_t li = 0; li < st->hdr.num_moe_layers && r == 0; li++) {
		r = moe_engine_forward(e, st->layers[li].layer, x, in->tokens, out, NULL, NULL, flags, err);
		for (uint64_t i = 0; r == 0 && i < n; i++)
			x[i] += out[i];
	}
	if (r == 0)
		memcpy(out, x, n * sizeof(*x));
	free(x);
	return r;
}

static double pct(uint64_t a, uint64_t b)
{
	return b ? 100.0 * (double)a / (double)b : 0.0;
}

static void print_layer_row(const char *name, const struct moe_engine_layer_stats *l)
{
	printf("  %-6s %9" PRIu64 " %9" PRIu64 " %6.1f%% %7" PRIu64 " %9.1f %9" PRIu64 " %9.2f",
	       name, l->host_hits, l->host_misses, pct(l->host_hits, l->host_hits + l->host_misses),
	       l->loads, (double)l->load_bytes / 1048576.0, l->evictions, (double)l->stall_ns / 1e6);
	if (l->predicted || l->prefetches)
		printf(" %6.1f%% %6.1f%% %6" PRIu64 "/%-6" PRIu64, pct(l->predicted_hit, l->predicted),
		       pct(l->predicted_hit, l->needed), l->prefetch_used, l->prefetches);
	printf("\n");
}

/* The expert cache and pager figures. */
static void print_cache(struct moe_engine *e, bool per_layer)
{
	const struct moe_store *s = moe_engine_store(e);
	uint32_t L = s->hdr.num_moe_layers;
	struct moe_engine_layer_stats *ls = calloc(L, sizeof(*ls));
	struct moe_engine_stats st;
	const struct moe_engine_layer_stats *t = &st.total;
	const struct moe_pager_stats *p = &st.pager;
	struct rusage ru;
	double busy, gb;

	moe_engine_get_stats(e, &st, ls);
	busy = (double)p->busy_ns / 1e9;
	gb = (double)p->bytes / 1e9;
	printf("host cache: ");
	if (st.host_budget)
		printf("budget %" PRIu64 " MiB = %" PRIu64 " MiB routers and shared experts + %" PRIu32
		       " slots of %.1f MiB", st.host_budget >> 20, st.host_fixed >> 20, st.slots,
		       (double)st.slot_bytes / 1048576.0);
	else
		printf("no budget (%" PRIu32 " slots of %.1f MiB, every expert fits)", st.slots,
		       (double)st.slot_bytes / 1048576.0);
	printf(", %" PRIu32 " in use, %" PRIu32 " pinned, policy %s\n", st.slots_used, st.pinned, st.policy);
	printf("device cache: none (CPU backend)\n");
	printf("pager: %s, staging in %s%s, ring %s; %" PRIu64 " blobs (%" PRIu64 " prefetched, %" PRIu64
	       " failed), %.1f MiB, %.0f MB/s while busy\n",
	       p->direct ? "O_DIRECT" : "buffered (page cache)", p->hugepages ? "huge pages" : "small pages",
	       p->fixed_buffers ? " (fixed buffers)" : " (not registered: RLIMIT_MEMLOCK?)",
	       p->ring_flags & (1u << 13) ? "single-issuer+defer-taskrun" :
	       p->ring_flags & (1u << 12) ? "single-issuer" : "plain",
	       p->loads, p->prefetch_loads, p->failed, (double)p->bytes / 1048576.0,
	       busy > 0 ? (double)p->bytes / busy / 1e6 : 0.0);
	printf("pager CPU: I/O thread %.3f s (%.3f s/GB), checksums and layout %.3f s (%.3f s/GB)\n",
	       (double)p->io_cpu_ns / 1e9, gb > 0 ? (double)p->io_cpu_ns / 1e9 / gb : 0.0,
	       (double)p->verify_cpu_ns / 1e9, gb > 0 ? (double)p->verify_cpu_ns / 1e9 / gb : 0.0);
	printf("  %-6s %9s %9s %7s %7s %9s %9s %9s", "layer", "hits", "misses", "hit", "loads", "MiB read",
	       "evicted", "stall ms");
	if (t->predicted || t->prefetches)
		printf(" %7s %7s %13s", "prec", "recall", "pf used/made");
	printf("\n");
	if (per_layer && ls)
		for (uint32_t i = 0; i < L; i++) {
			char name[16];

			if (!ls[i].forwards)
				continue;
			snprintf(name, sizeof(name), "%" PRIu32, s->layers[i].layer);
			print_layer_row(name, &ls[i]);
		}
	print_layer_row("total", t);
	if (getrusage(RUSAGE_SELF, &ru) == 0)
		printf("peak resident memory: %.1f MiB (weights: %.1f MiB in the host cache and %.1f MiB "
		       "always resident; pager staging %.0f MiB)\n", (double)ru.ru_maxrss / 1024.0,
		       (double)st.slots_used * (double)st.slot_bytes / 1048576.0,
		       (double)st.host_fixed / 1048576.0, (double)st.pager.staging_bytes / 1048576.0);
	free(ls);
}

/* The error of a libmoeclient call, with what was being done; returns the
 * exit status. */
static int client_fail(const char *what, int r)
{
	const char *path = getenv("MOED_SOCKET"), *why = moe_client_last_error();

	if (*why)
		return moectl_failx(moectl_status_of(r), "forward: %s: %s", what, why);
	return moectl_failx(moectl_status_of(r), "forward: %s (moed at %s): %s", what,
			    path && *path ? path : MOE_DEFAULT_SOCKET, moe_strerror(r));
}

/* forward through moed: the same bits as --model. */
static int forward_daemon(const struct fwd_args *a)
{
	struct moe_client *c = NULL;
	struct moe_model_info info;
	struct fwd_input in = { 0 };
	uint64_t n, nk;
	float *out = NULL, *w = NULL, *x = NULL;
	int32_t *ids = NULL;
	uint16_t *b16 = NULL;
	double first = 0, rest = 0;
	int r, status = 1;

	if ((r = moectl_connect("forward", &c)) != 0)
		return r;
	moe_client_info(c, &info);
	if (load_input(a, info.hidden_size, &in))
		goto out;
	n = in.tokens * info.hidden_size;
	nk = in.tokens * info.top_k;
	if (a->save_input && write_array(a, a->save_input, &in, in.x, n))
		goto out;
	out = malloc((n ? n : 1) * sizeof(*out));
	x = malloc((n ? n : 1) * sizeof(*x));
	b16 = a->bf16 ? malloc((n ? n : 1) * sizeof(*b16)) : NULL;
	if (a->routing_out) {
		ids = malloc((nk ? nk : 1) * sizeof(*ids));
		w = malloc((nk ? nk : 1) * sizeof(*w));
	}
	if (!out || !x || (a->bf16 && !b16) || (a->routing_out && (!ids || !w))) {
		moectl_failx(MOECTL_INTERNAL, "forward: out of memory for %" PRIu64 " tokens", in.tokens);
		goto out;
	}
	for (uint64_t rep = 0; rep < a->repeat; rep++) {
		double t0 = moectl_now(), dt;
		uint32_t nl = a->all_layers ? info.num_moe_layers : 1;

		if (a->fresh && rep > 0)
			random_fill(in.x, n, a->seed + rep, a->bf16);
		memcpy(x, in.x, n * sizeof(*x));
		for (uint32_t l = 0; l < nl; l++) {
			uint32_t layer = a->all_layers ? info.moe_layers[l] : (uint32_t)a->layer;

			if (a->bf16 && !a->all_layers) {
				/* bfloat16 on the wire: the input is bf16-exact, the output rounds as --model's
				 * (a residual stream stays float32 between layers, as with --model) */
				for (uint64_t i = 0; i < n; i++)
					b16[i] = moe_f32_to_bf16(x[i]);
				r = moe_client_forward(c, layer, MOE_BF16, b16, b16, in.tokens, ids, w);
				for (uint64_t i = 0; r == 0 && i < n; i++)
					out[i] = moe_bf16_to_f32(b16[i]);
			} else {
				r = moe_client_forward(c, layer, MOE_F32, x, out, in.tokens, ids, w);
			}
			if (r < 0) {
				char what[64];

				snprintf(what, sizeof(what), "layer %u", layer);
				status = client_fail(what, r);
				goto out;
			}
			if (a->all_layers) {
				for (uint64_t i = 0; i < n; i++)
					x[i] += out[i];
			}
		}
		if (a->all_layers)
			memcpy(out, x, n * sizeof(*x));
		dt = moectl_now() - t0;
		if (rep == 0)
			first = dt;
		else
			rest += dt;
	}
	if (a->output && write_array(a, a->output, &in, out, n))
		goto out;
	if (a->routing_out) {
		struct moe_err err = { 0 };
		struct moe_npz_entry ent[2] = {
			{ .name = "ids", .type = MOE_NPY_I32, .ndim = 2,
			  .shape = { in.tokens, info.top_k }, .data = ids },
			{ .name = "weights", .type = MOE_NPY_F32, .ndim = 2,
			  .shape = { in.tokens, info.top_k }, .data = w },
		};

		if (moe_npz_write(a->routing_out, ent, 2, &err) < 0) {
			moectl_fail_err(&err);
			goto out;
		}
	}
	if (a->stats) {
		printf("%s of a %s model through moed (backend %s): %" PRIu64 " tokens x hidden %" PRIu32 "\n",
		       a->all_layers ? "every MoE layer" : "one layer", info.model_type, info.backend, in.tokens,
		       info.hidden_size);
		printf("first run: %.3f ms\n", first * 1e3);
		if (a->repeat > 1) {
			double mean = rest / (double)(a->repeat - 1);

			printf("later runs: %.3f ms mean over %" PRIu64 " runs\n", mean * 1e3, a->repeat - 1);
			printf("tokens/s: %.0f\n", mean > 0 ? (double)in.tokens / mean : 0.0);
		}
		printf("(moectl stats shows moed's expert load, cache and pager figures)\n");
	}
	status = 0;
out:
	free(in.x);
	free(out);
	free(x);
	free(b16);
	free(ids);
	free(w);
	moe_client_disconnect(c);
	return status;
}

int cmd_forward(int argc, char **argv)
{
	struct moe_engine_options eo = { 0 };
	struct moe_engine *e = NULL;
	struct moe_err err = { 0 };
	struct fwd_input in = { 0 };
	const struct moe_model_config *cfg;
	const struct moe_backend *be;
	struct fwd_args a;
	float *out = NULL, *w = NULL;
	int32_t *ids = NULL;
	uint64_t n, nk;
	double first = 0, rest = 0, rest_min = 0;
	unsigned flags;
	int r, status = 1;

	r = parse_args(argc, argv, &a);
	if (r)
		return r < 0 ? 0 : r;
	if (!a.model)
		return forward_daemon(&a);

	eo.backend = a.backend;
	eo.threads = (uint32_t)a.threads;
	eo.host_bytes = a.host_mb << 20;
	eo.device_bytes = a.gpu_mb << 20;
	eo.policy = a.policy;
	eo.pin = a.npins ? a.pins : NULL;
	eo.pin_hot = (uint32_t)a.pin_hot;
	eo.prefetch = a.prefetch;
	eo.pager.queue_depth = (uint32_t)a.queue_depth;
	eo.pager.chunk_kb = (uint32_t)a.chunk_kb;
	eo.log = moectl_log;
	r = moe_engine_open(a.model, &eo, &e, &err);
	if (r < 0)
		return moectl_fail_err(&err);
	cfg = moe_engine_config(e);
	if (a.trace_out && moe_engine_trace(e, a.trace_out, &err) < 0) {
		moectl_fail_err(&err);
		goto out;
	}
	if (a.fault && moe_engine_inject_fault(e, a.fault, (uint32_t)a.fault_layer, (uint32_t)a.fault_expert,
					       (uint32_t)a.fault_count) < 0) {
		moectl_fail("forward: --inject-fault: layer %" PRIu64 " is not an MoE layer or expert %" PRIu64
			    " is out of range", a.fault_layer, a.fault_expert);
		goto out;
	}
	if (load_input(&a, cfg->hidden_size, &in))
		goto out;

	n = in.tokens * cfg->hidden_size;
	if (a.save_input && write_array(&a, a.save_input, &in, in.x, n))
		goto out;
	nk = in.tokens * cfg->top_k;
	out = malloc((n ? n : 1) * sizeof(*out));
	if (a.routing_out) {
		ids = malloc((nk ? nk : 1) * sizeof(*ids));
		w = malloc((nk ? nk : 1) * sizeof(*w));
	}
	if (!out || (a.routing_out && (!ids || !w))) {
		moectl_failx(MOECTL_INTERNAL, "forward: out of memory for %" PRIu64 " tokens", in.tokens);
		goto out;
	}

	flags = a.all_experts ? MOE_FWD_ALL_EXPERTS : 0;
	for (uint64_t i = 0; i < a.repeat; i++) {
		double t0 = moectl_now(), dt;

		moe_err_clear(&err);
		if (a.fresh && i > 0)
			random_fill(in.x, n, a.seed + i, a.bf16);
		if (a.all_layers)
			r = forward_all(e, &in, out, flags, &err);
		else
			r = moe_engine_forward(e, (uint32_t)a.layer, in.x, in.tokens, out, ids, w, flags, &err);
		if (r < 0) {
			status = moectl_fail_err(&err);   /* 5 for a read or checksum failure */
			goto out;
		}
		dt = moectl_now() - t0;
		if (i == 0) {
			first = dt;
		} else {
			rest += dt;
			rest_min = i == 1 || dt < rest_min ? dt : rest_min;
		}
	}

	if (a.output && write_array(&a, a.output, &in, out, n))
		goto out;
	if (a.routing_out) {
		struct moe_npz_entry ent[2] = {
			{ .name = "ids", .type = MOE_NPY_I32, .ndim = 2,
			  .shape = { in.tokens, cfg->top_k }, .data = ids },
			{ .name = "weights", .type = MOE_NPY_F32, .ndim = 2,
			  .shape = { in.tokens, cfg->top_k }, .data = w },
		};

		if (moe_npz_write(a.routing_out, ent, 2, &err) < 0) {
			moectl_fail_err(&err);
			goto out;
		}
	}

	if (a.stats) {
		be = moe_engine_backend(e);
		if (a.all_layers)
			printf("all %" PRIu32 " MoE layers of a %s model: %" PRIu64 " tokens x hidden %" PRIu32 ", ",
			       moe_engine_store(e)->hdr.num_moe_layers, moe_arch_name(cfg->arch), in.tokens,
			       cfg->hidden_size);
		else
			printf("layer %" PRIu64 " of a %s model: %" PRIu64 " tokens x hidden %" PRIu32 ", ",
			       a.layer, moe_arch_name(cfg->arch), in.tokens, cfg->hidden_size);
		if (a.all_experts)
			printf("all %" PRIu32 " experts per token (dense comparison, not the model's output)\n",
			       cfg->num_experts);
		else
			printf("top-%" PRIu32 " of %" PRIu32 " experts\n", cfg->top_k, cfg->num_experts);
		printf("backend: %s%s%s%s\n", be && be->ops ? be->ops->name : "?",
		       be && be->reason[0] ? " (" : "", be ? be->reason : "",
		       be && be->reason[0] ? ")" : "");
		printf("first run: %.2f ms (includes reading the experts it needs from the store)\n",
		       first * 1e3);
		if (a.repeat > 1) {
			double mean = rest / (double)(a.repeat - 1);

			printf("later runs: %.3f ms mean, %.3f ms min over %" PRIu64 " runs\n",
			       mean * 1e3, rest_min * 1e3, a.repeat - 1);
			printf("tokens/s: %.0f (mean over runs 2-%" PRIu64
			       "; the first run, which loads experts, is excluded)\n",
			       mean > 0 ? (double)in.tokens / mean : 0.0, a.repeat);
		} else {
			printf("tokens/s: %.0f (one run, including loading experts; use --repeat N for the steady state)\n",
			       first > 0 ? (double)in.tokens / first : 0.0);
		}
		if (a.all_experts)
			printf("expert load: every expert sees every token (--all-experts)\n");
		else if (!a.all_layers && print_load(&a, e, (uint32_t)a.layer))
			goto out;
		print_cache(e, a.all_layers);
	}
	if (a.stats_json) {
		char *js = moe_engine_stats_json(e);
		FILE *f = strcmp(a.stats_json, "-") ? fopen(a.stats_json, "w") : stdout;

		if (!js || !f || fprintf(f, "%s\n", js) < 0 || (f != stdout && fclose(f) != 0)) {
			moectl_fail("forward: cannot write %s: %s", a.stats_json, js ? strerror(errno) : "out of memory");
			free(js);
			goto out;
		}
		free(js);
	}
	status = 0;
out:
	free(in.x);
	free(out);
	free(ids);
	free(w);
	moe_engine_close(e);
	return status;
}
