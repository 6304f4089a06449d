/* SPDX-License-Identifier: MIT */
/*
 * moectl info and moectl stats: what moed serves and how it is doing,
 * through libmoeclient.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine/dtype.h"
#include "libmoeclient/moeclient.h"
#include "moectl.h"

#define HIST_WIDTH 30      /* characters of the longest bar */
#define HIST_TOP 8         /* busiest experts shown per layer */

static const char info_help[] =
	"usage: moectl [--socket PATH] info [--json]\n"
	"\n"
	"What moed serves: the model's type, shapes and weight dtype, its MoE layers\n"
	"(the checkpoint's layer numbers), the backend, the fingerprint of the\n"
	"checkpoint the store was packed from, and this session's limits (tokens per\n"
	"request: limits.max_tokens, less what the session's arena cannot hold).\n"
	"\n"
	"  --json             one JSON object instead of text\n"
	"  -s, --socket PATH  moed's socket (default $MOED_SOCKET, else " MOE_DEFAULT_SOCKET ")\n"
	"  -h, --help         this text\n"
	"\n"
	"Exit status: 0, or 3 cannot reach moed, 4 refused (see moectl(1)).\n";

static const char stats_help[] =
	"usage: moectl [--socket PATH] stats [--json]\n"
	"\n"
	"moed's figures since it started: uptime, clients, requests, errors, batches,\n"
	"tokens and tokens/s; latency percentiles; per layer, the expert load (the\n"
	"busiest experts as a histogram, with max/mean); the expert cache (hits,\n"
	"misses, evictions per tier) and the pager (bytes read, stalls).\n"
	"\n"
	"  --json             moed's JSON object as it sends it (its fields: moectl(1), stats)\n"
	"  -s, --socket PATH  moed's socket (default $MOED_SOCKET, else " MOE_DEFAULT_SOCKET ")\n"
	"  -h, --help         this text\n"
	"\n"
	"Exit status: 0, or 3 cannot reach moed, 4 refused (see moectl(1)).\n";

/* --json or nothing: returns 0, an exit status (error printed), or -1
 * after --help. */
static int parse_json_flag(const char *cmd, const char *help, int argc, char **argv, bool *json)
{
	*json = false;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--json")) {
			*json = true;
		} else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			fputs(help, stdout);
			return -1;
		} else if (argv[i][0] == '-') {
			return moectl_unknown(cmd, "option", argv[i], (const char *const[]){ "json", "help", "socket" },
					      3);
		} else {
			return moectl_usage(cmd, "unexpected argument '%s'", argv[i]);
		}
	}
	return 0;
}

int cmd_info(int argc, char **argv)
{
	/* moe-store(5)'s numbers */
	static const char *const dtypes[] = { "f32", "bf16", "f16", "fp8_e4m3_b128", "mxfp4", "int4" };
	struct moe_client *c;
	struct moe_model_info in;
	char fp[MOE_FINGERPRINT_LEN];
	const char *dn;
	bool json, have_fp;
	int r = parse_json_flag("info", info_help, argc, argv, &json);

	if (r)
		return r < 0 ? 0 : r;
	if ((r = moectl_connect("info", &c)) != 0)
		return r;
	moe_client_info(c, &in);
	have_fp = moe_client_fingerprint(c, fp) == 0;
	dn = in.weight_dtype < sizeof(dtypes) / sizeof(dtypes[0]) ? dtypes[in.weight_dtype] : "?";
	if (json) {
		json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:s,s:i,s:i,s:I}", "model_type", in.model_type,
				      "backend", in.backend, "hidden_size", (int)in.hidden_size,
				      "moe_intermediate_size", (int)in.moe_intermediate_size,
				      "num_experts", (int)in.num_experts, "top_k", (int)in.top_k,
				      "num_hidden_layers", (int)in.num_hidden_layers,
				      "n_shared_experts", (int)in.n_shared_experts,
				      "weight_dtype", dn,
				      "max_tokens", (int)in.max_tokens, "num_moe_layers", (int)in.num_moe_layers,
				      "arena_bytes", (json_int_t)in.arena_bytes);
		json_t *layers = json_array();
		char *text;

		for (uint32_t i = 0; i < in.num_moe_layers; i++)
			json_array_append_new(layers, json_integer(in.moe_layers[i]));
		json_object_set_new(o, "moe_layers", layers);
		/* null: the store records none, or moed predates fingerprints */
		json_object_set_new(o, "fingerprint", have_fp ? json_string(fp) : json_null());
		text = json_dumps(o, MOECTL_JSON_FLAGS);
		printf("%s\n", text ? text : "{}");
		free(text);
		json_decref(o);
	} else {
		printf("model: %s, backend %s, %s weights\n", in.model_type, in.backend,
		       dn);
		printf("hidden %u, %u experts of %u, top-%u, %u shared; %u layers, %u of them MoE:",
		       in.hidden_size, in.num_experts, in.moe_intermediate_size, in.top_k, in.n_shared_experts,
		       in.num_hidden_layers, in.num_moe_layers);
		for (uint32_t i = 0; i < in.num_moe_layers; i++)
			printf("%s%u", i ? "," : " ", in.moe_layers[i]);
		/* moed lowers limits.max_tokens_per_request to what the session's
		 * arena holds (float32 in and out and the routing, per token,
		 * daemon/session.c): say which of the two this figure is */
		uint64_t per = 2ull * in.hidden_size * 4 + 2ull * in.top_k * 4;

		if (per && in.max_tokens == in.arena_bytes / per)
			printf("\nrequests: up to %u tokens (the most this session's arena of %.1f MiB holds at %" PRIu64
			       " bytes a token; limits.max_tokens_per_request may be higher)\n", in.max_tokens,
			       (double)in.arena_bytes / 1048576.0, per);
		else
			printf("\nrequests: up to %u tokens (limits.max_tokens_per_request); this session's arena: "
			       "%.1f MiB\n", in.max_tokens, (double)in.arena_bytes / 1048576.0);
		printf("fingerprint: %s\n", have_fp ? fp : "none");
	}
	moe_client_disconnect(c);
	return 0;
}

static double num(json_t *o, const char *key)
{
	json_t *v = json_object_get(o, key);

	return json_is_number(v) ? json_number_value(v) : 0.0;
}

/* One layer's load: the busiest experts as bars, the imbalance ratio. */
static void print_load(json_t *layer)
{
	json_t *ex = json_object_get(layer, "experts");
	size_t n = json_array_size(ex);
	uint64_t *cnt = calloc(n ? n : 1, sizeof(*cnt)), total = 0, max = 0;
	uint32_t *order = calloc(n ? n : 1, sizeof(*order)), idle = 0;

	if (!cnt || !order) {
		free(cnt);
		free(order);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		cnt[i] = (uint64_t)json_integer_value(json_array_get(ex, i));
		total += cnt[i];
		max = cnt[i] > max ? cnt[i] : max;
		idle += cnt[i] == 0;
		order[i] = (uint32_t)i;
	}
		/* each token goes to top_k experts: these are token-expert pairs */
	printf("layer %d: %" PRIu64 " token-expert pairs routed", (int)num(layer, "layer"), total);
	if (!total) {
		printf("\n");
		free(cnt);
		free(order);
		return;
	}
	printf(", imbalance max/mean %.2f, %u of %zu experts idle\n", (double)max / ((double)total / (double)n),
	       idle, n);
	for (size_t i = 0; i < n && i < HIST_TOP; i++) {   /* a partial selection sort */
		size_t b = i;

		for (size_t j = i + 1; j < n; j++)
			if (cnt[order[j]] > cnt[order[b]])
				b = j;
		uint32_t t = order[i];
		order[i] = order[b];
		order[b] = t;
		int bar = (int)((cnt[order[i]] * HIST_WIDTH + max - 1) / max);
		printf("  expert %4u |%.*s%*s| %8" PRIu64 " %5.1f%%\n", order[i], bar,
		       "##############################", HIST_WIDTH - bar, "", cnt[order[i]],
		       100.0 * (double)cnt[order[i]] / (double)total);
	}
	free(cnt);
	free(order);
}

int cmd_stats(int argc, char **argv)
{
	struct moe_client *c;
	char *text = NULL;
	json_t *root, *eng, *lat, *arr;
	bool json;
	int r = parse_json_flag("stats", stats_help, argc, argv, &json);

	if (r)
		return r < 0 ? 0 : r;
	if ((r = moectl_connect("stats", &c)) != 0)
		return r;
	r = moe_client_stats(c, &text);
	moe_client_disconnect(c);
	if (r < 0)
		return moectl_failx(moectl_status_of(r), "stats: %s", moe_strerror(r));
	root = json_loads(text, 0, NULL);
	free(text);
	if (!root)
		return moectl_fail("stats: moed sent figures that are not JSON");
	if (json) {
		/* in moectl's one JSON style, not moed's compact wire form */
		text = json_dumps(root, MOECTL_JSON_FLAGS);
		json_decref(root);
		if (!text)
			return moectl_failx(MOECTL_INTERNAL, "stats: out of memory");
		printf("%s\n", text);
		free(text);
		return 0;
	}
	printf("moed: %s (%s), up %.0f s, %d clients connected\n",
	       json_string_value(json_object_get(root, "model")), json_string_value(json_object_get(root, "store")),
	       num(root, "uptime_s"), (int)num(root, "clients_connected"));
	printf("requests %.0f (errors %.0f) in %.0f batches, %.0f tokens, %.0f tokens/s now\n",
	       num(root, "requests"), num(root, "errors"), num(root, "batches"), num(root, "tokens"),
	       num(root, "tokens_per_s"));
	lat = json_object_get(root, "latency");
	if (num(lat, "samples") > 0)
		printf("latency in moed (taken to completed), last %.0f requests: p50 %.1f us, p90 %.1f us, "
		       "p99 %.1f us, max %.1f us\n", num(lat, "samples"), num(lat, "p50_us"), num(lat, "p90_us"),
		       num(lat, "p99_us"), num(lat, "max_us"));
	{
		/* what peers made moed say (refusals, drops, bad requests): the
		 * log keeps the first few of each interval, these are all */
		json_t *ev = json_object_get(root, "events"), *v;
		const char *k;
		bool any = false;

		json_object_foreach(ev, k, v)
			any |= json_number_value(v) > 0;
		if (any) {
			printf("events:");
			json_object_foreach(ev, k, v)
				printf(" %s %.0f", k, json_number_value(v));
			printf("\n");
		}
	}
	arr = json_object_get(root, "clients");
	for (size_t i = 0; i < json_array_size(arr); i++) {
		json_t *cl = json_array_get(arr, i);

		printf("  client %d: pid %d, uid %d: %.0f requests, %.0f tokens, %.0f errors\n", (int)num(cl, "id"),
		       (int)num(cl, "pid"), (int)num(cl, "uid"), num(cl, "requests"), num(cl, "tokens"),
		       num(cl, "errors"));
	}
	eng = json_object_get(root, "engine");
	if (eng) {
		json_t *hc = json_object_get(eng, "host_cache"), *pg = json_object_get(eng, "pager");
		json_t *tot = json_object_get(eng, "total"), *host = json_object_get(tot, "host");
		double hits = num(host, "hits"), misses = num(host, "misses"), busy = num(pg, "busy_ns") / 1e9;

		printf("host cache: %.0f of %.0f slots of %.1f MiB in use, %.0f pinned, policy %s; hit rate %.1f%% "
		       "(%.0f hits, %.0f misses), %.0f evictions\n", num(hc, "slots_used"), num(hc, "slots"),
		       num(hc, "slot_bytes") / 1048576.0, num(hc, "pinned"),
		       json_string_value(json_object_get(hc, "policy")),
		       hits + misses > 0 ? 100.0 * hits / (hits + misses) : 0.0, hits, misses, num(tot, "evictions"));
		printf("pager: %.0f blobs, %.1f MiB read, %.0f MB/s while busy, %.0f failed, stall %.1f ms\n",
		       num(pg, "loads"), num(pg, "bytes") / 1048576.0, busy > 0 ? num(pg, "bytes") / busy / 1e6 : 0.0,
		       num(pg, "failed"), num(tot, "stall_ns") / 1e6);
		json_t *sto = json_object_get(eng, "store");
		const char *why = json_string_value(json_object_get(sto, "why"));

		if (sto)
			printf("store: %s, %.0f failed reads, %.0f checksum mismatches, %.0f reopens%s%s\n",
			       json_string_value(json_object_get(sto, "state")), num(sto, "read_errors"),
			       num(sto, "checksum_errors"), num(sto, "reopens"), why && why[0] ? ": " : "",
			       why ? why : "");
	}
	arr = json_object_get(root, "expert_load");
	for (size_t i = 0; i < json_array_size(arr); i++)
		print_load(json_array_get(arr, i));
	json_decref(root);
	return 0;
}

/* ------------------------------------------------------------------ bench */

#define BENCH_MAX_CLIENTS 256
/* each client cycles through up to this many different inputs (at most
 * 64 MiB of them), so that its requests route to different experts as a
 * generating model's steps do */
#define BENCH_INPUTS 16
#define BENCH_INPUT_BYTES (64u << 20)
#define BENCH_SAMPLES 200000u     /* latencies kept per client */

struct bench_slot {
	uint64_t requests, tokens, errors;
	int first_error;
	uint32_t nsamples;
	float lat_us[BENCH_SAMPLES];
};

struct bench_shared {
	volatile int ready;           /* children connected and warmed up */
	volatile int go;              /* the parent's start signal */
	double t_start, t_end;        /* CLOCK_MONOTONIC seconds */
	struct bench_slot slot[];
};

static void bench_usage(FILE *f)
{
	fputs("usage: moectl bench [--clients N] [--tokens T] [--duration S] [--warmup S]\n"
	      "                    [--layer L] [--dtype f32|bf16] [--json]\n"
	      "\n"
	      "Load moed from N client processes, each sending requests of T random tokens\n"
	      "to layer L (default: the first MoE layer) back to back for S seconds after a\n"
	      "warm-up; prints the aggregate tokens/s and the latency percentiles of the\n"
	      "requests (as each client sees them: submit to completion, copies included).\n"
	      "Defaults: 1 client, 1 token, 5 s, 1 s warm-up.\n", f);
}

static int cmp_float(const void *a, const void *b)
{
	float x = *(const float *)a, y = *(const float *)b;

	return x < y ? -1 : x > y;
}

static void bench_child(struct bench_shared *sh, int idx, uint32_t layer, uint64_t tokens, bool bf16,
			double warmup)
{
	struct bench_slot *sl = &sh->slot[idx];
	struct moe_client *c;
	struct moe_model_info info;
	uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(idx + 1), n, esz, nin, next = 0;
	float *x, *y;
	int r = moe_client_connect(NULL, NULL, &c);

	if (r < 0) {
		sl->first_error = r;
		__atomic_fetch_add(&sh->ready, 1, __ATOMIC_SEQ_CST);
		_exit(1);
	}
	moe_client_info(c, &info);
	n = tokens * info.hidden_size;
	esz = bf16 ? 2 : 4;
	nin = BENCH_INPUT_BYTES / (n * esz);
	nin = nin < 1 ? 1 : nin > BENCH_INPUTS ? BENCH_INPUTS : nin;
	x = malloc(nin * n * esz);
	y = malloc(n * sizeof(float));
	if (!x || !y)
		_exit(1);
	for (uint64_t i = 0; i < nin * n; i++) {
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		float v = (float)((double)(seed >> 40) / (double)(1u << 23) - 1.0);
		if (bf16) {
			uint16_t b = moe_f32_to_bf16(v);
			memcpy((uint16_t *)x + i, &b, 2);
		} else {
			x[i] = v;
		}
	}
	/* warm-up: the experts come in, the threads spin up */
	for (double t0 = moectl_now(); moectl_now() - t0 < warmup;)
		if (moe_client_forward(c, layer, bf16 ? MOE_BF16 : MOE_F32,
				       (char *)x + (next++ % nin) * n * esz, y, tokens, NULL, NULL) < 0)
			break;
	__atomic_fetch_add(&sh->ready, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_load_n(&sh->go, __ATOMIC_ACQUIRE))
		usleep(100);
	while (moectl_now() < sh->t_end) {
		double t0 = moectl_now();

		r = moe_client_forward(c, layer, bf16 ? MOE_BF16 : MOE_F32,
				       (char *)x + (next++ % nin) * n * esz, y, tokens, NULL, NULL);
		double t1 = moectl_now();

		if (t0 < sh->t_start)
			continue;
		if (r < 0) {
			if (!sl->errors++)
				sl->first_error = r;
			if (r == -ESHUTDOWN || r == -ECONNRESET)
				break;
			continue;
		}
		sl->requests++;
		sl->tokens += tokens;
		if (sl->nsamples < BENCH_SAMPLES)
			sl->lat_us[sl->nsamples++] = (float)((t1 - t0) * 1e6);
	}
	moe_client_disconnect(c);
	free(x);
	free(y);
	_exit(0);
}

int cmd_bench(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "clients", required_argument, NULL, 'c' }, { "tokens", required_argument, NULL, 't' },
		{ "duration", required_argument, NULL, 'd' }, { "warmup", required_argument, NULL, 'w' },
		{ "layer", required_argument, NULL, 'l' }, { "dtype", required_argument, NULL, 'D' },
		{ "json", no_argument, NULL, 'j' }, { "help", no_argument, NULL, 'h' }, { NULL, 0, NULL, 0 },
	};
	uint64_t clients = 1, tokens = 1, layer = UINT64_MAX;
	double duration = 5.0, warmup = 1.0;
	bool json = false, bf16 = false;
	struct moe_client *c;
	struct moe_model_info info;
	struct bench_shared *sh;
	size_t shlen;
	pid_t pids[BENCH_MAX_CLIENTS];
	int o, r, status = 0;

	optind = 1;
	opterr = 0;
	while ((o = getopt_long(argc, argv, "+:h", opts, NULL)) != -1) {
		char *end;

		switch (o) {
		case 'c':
			if (moectl_parse_u64("--clients", optarg, 1, BENCH_MAX_CLIENTS, &clients) < 0)
				return 1;
			break;
		case 't':
			if (moectl_parse_u64("--tokens", optarg, 1, 1u << 20, &tokens) < 0)
				return 1;
			break;
		case 'l':
			if (moectl_parse_u64("--layer", optarg, 0, UINT32_MAX, &layer) < 0)
				return 1;
			break;
		case 'd':
		case 'w': {
			double v = strtod(optarg, &end);

			if (end == optarg || *end || !(v >= 0) || v > 3600)
				return moectl_fail("bench: %s wants seconds from 0 to 3600, not '%s'",
						   o == 'd' ? "--duration" : "--warmup", optarg);
			if (o == 'd')
				duration = v;
			else
				warmup = v;
			break;
		}
		case 'D':
			if (!strcmp(optarg, "bf16"))
				bf16 = true;
			else if (strcmp(optarg, "f32"))
				return moectl_fail("bench: --dtype must be f32 or bf16, not '%s'", optarg);
			break;
		case 'j':
			json = true;
			break;
		case 'h':
			bench_usage(stdout);
			return 0;
		default:
			return moectl_getopt_error("bench", o, argc, argv, opts);
		}
	}
	if (optind < argc)
		return moectl_usage("bench", "unexpected argument '%s'", argv[optind]);
	if (duration <= 0)
		return moectl_fail("bench: --duration must be above 0");
	if ((r = moectl_connect("bench", &c)) != 0)
		return r;
	moe_client_info(c, &info);
	if (layer == UINT64_MAX)
		layer = info.num_moe_layers ? info.moe_layers[0] : 0;
	info.moe_layers = NULL;          /* gone with the session */
	moe_client_disconnect(c);
	if (tokens > info.max_tokens)
		return moectl_fail("bench: --tokens %" PRIu64 " exceeds moed's %u tokens per request", tokens,
				   info.max_tokens);

	shlen = sizeof(*sh) + clients * sizeof(struct bench_slot);
	sh = mmap(NULL, shlen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return moectl_fail("bench: cannot map %zu bytes: %s", shlen, strerror(errno));
	fflush(stdout);
	for (uint64_t i = 0; i < clients; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			moectl_fail("bench: fork: %s", strerror(errno));
			clients = i;
			status = 1;
			break;
		}
		if (pids[i] == 0)
			bench_child(sh, (int)i, (uint32_t)layer, tokens, bf16, warmup);
	}
	while (status == 0 && __atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) < (int)clients)
		usleep(1000);
	sh->t_start = moectl_now() + 0.05;
	sh->t_end = sh->t_start + duration;
	__atomic_store_n(&sh->go, 1, __ATOMIC_RELEASE);
	for (uint64_t i = 0; i < clients; i++) {
		int st;

		waitpid(pids[i], &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			status = 1;
	}

	uint64_t reqs = 0, toks = 0, errs = 0, ns = 0;
	int first_error = 0;
	for (uint64_t i = 0; i < clients; i++) {
		reqs += sh->slot[i].requests;
		toks += sh->slot[i].tokens;
		errs += sh->slot[i].errors;
		ns += sh->slot[i].nsamples;
		if (!first_error)
			first_error = sh->slot[i].first_error;
	}
	float *all = malloc((ns ? ns : 1) * sizeof(float));
	if (!all) {
		munmap(sh, shlen);
		return moectl_failx(MOECTL_INTERNAL, "bench: out of memory");
	}
	ns = 0;
	for (uint64_t i = 0; i < clients; i++) {
		memcpy(all + ns, sh->slot[i].lat_us, sh->slot[i].nsamples * sizeof(float));
		ns += sh->slot[i].nsamples;
	}
	qsort(all, ns, sizeof(float), cmp_float);
	double p50 = ns ? all[ns / 2] : 0, p90 = ns ? all[ns * 9 / 10] : 0, p99 = ns ? all[ns * 99 / 100] : 0;
	double mx = ns ? all[ns - 1] : 0, tps = (double)toks / duration;
	if (json) {
		/* in moectl's one JSON style, as info and stats --json */
		json_t *res = json_pack("{s:I,s:I,s:I,s:f,s:I,s:I,s:f,s:{s:f,s:f,s:f,s:f}}",
					"clients", (json_int_t)clients, "tokens_per_request", (json_int_t)tokens,
					"layer", (json_int_t)layer, "duration_s", duration,
					"requests", (json_int_t)reqs, "errors", (json_int_t)errs, "tokens_per_s", tps,
					"latency_us", "p50", p50, "p90", p90, "p99", p99, "max", mx);
		char *text = res ? json_dumps(res, MOECTL_JSON_FLAGS) : NULL;

		printf("%s\n", text ? text : "{}");
		free(text);
		json_decref(res);
	} else {
		printf("moed bench: %" PRIu64 " client%s x %" PRIu64 "-token requests to layer %" PRIu64
		       " (%s), %.1f s after %.1f s of warm-up\n", clients, clients > 1 ? "s" : "", tokens, layer,
		       info.model_type, duration, warmup);
		printf("requests %" PRIu64 " (errors %" PRIu64 "), %.0f requests/s, %.0f tokens/s\n", reqs, errs,
		       (double)reqs / duration, tps);
		printf("latency per request: p50 %.1f us, p90 %.1f us, p99 %.1f us, max %.1f us\n", p50, p90, p99, mx);
	}
	if (errs)
		status = moectl_failx(moectl_status_of(first_error), "bench: %" PRIu64
				      " requests failed, the first with: %s", errs, moe_strerror(first_error));
	free(all);
	munmap(sh, shlen);
	return status;
}
