/* SPDX-License-Identifier: MIT */
/*
 * bench_pager: the io_uring pager against fio on the same store file, and
 * the eviction policy against LRU and Belady.
 *
 * Paging (bench_pager [-w W] [-b MB] [-F FIO [-G] | -f MBPS] [-n NAME] [-q] STORE):
 *
 *   bandwidth  every routed expert of the store (or the first -b MB of
 *              them), in store order, with at most W loads outstanding,
 *              each into its own destination blob as the engine's host
 *              slots are: once with the CPU backend's blob_prepare_range
 *              as the sink (what the engine does), once hash-only (no
 *              sink), so the cost of the layout conversion shows, and
 *              with the sink and one load at a time; several passes, each
 *              on a fresh pager with the default options (32 chunks of
 *              1 MiB in flight);
 *   anchor     fio on the same file (-F: io_uring, O_DIRECT, 1 MiB blocks,
 *              depth 32), run by us just before each pass of the pager: the
 *              disk of a shared virtual machine drifts by 2x within a
 *              minute, so each pass is divided by the fio run next to it
 *              and the ratio is the median of those; or a fixed figure
 *              (-f MB/s).  With -G, fio again with its buffers in huge
 *              pages, as the pager's staging is: the stricter anchor on a
 *              virtual disk, where a 1 MiB read into 4 KiB pages is more
 *              segments than one virtio request carries;
 *   CPU        CPU seconds per GB of the I/O thread (the ring), of the
 *              verify thread (XXH3 and the sink) and of the whole process
 *              (getrusage), next to what XXH3 and the conversion alone
 *              cost per GB on this machine, measured in the same run on
 *              memory out of cache, and fio's own;
 *   cold load  one expert on a fresh pager after the page cache is dropped
 *              (when we may), submit to done, median over several experts
 *              far apart in the file; anchor: its bytes at fio's bandwidth.
 *
 * Hit rates (bench_pager -H [-q] STORE, a small model made with
 * --router-skew): a routing trace from the engine itself, many random
 * batches through every MoE layer of a residual stream (x += layer(norm(x))),
 * kept in memory from the routing ids moe_engine_forward returns, then
 * moe_cache_simulate with LRU, the engine's policy (freq) and Belady's
 * optimum at 5, 10, 25 and 50 % of the model's experts.
 *
 * Every figure is a ratio to an anchor of the same run: the machine is a
 * shared virtual one.  Timing only: never part of make check.  bench/run-pager
 * makes the stores, runs this on each and saves the output.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "engine/backend.h"
#include "engine/cache.h"
#include "engine/engine.h"
#include "engine/pager.h"
#include "engine/store.h"
#include "benchutil.h"

#define HUGE_2M (2u << 20)
#define MAX_WINDOW 64          /* loads outstanding at most (-w) */
#define MAX_REPS 9             /* passes per bandwidth figure */

/* The targets of the issue, printed beside the ratios. */
#define TARGET_BIG 0.90        /* of fio, experts of 32 MB and more */
#define TARGET_SMALL 0.85      /* of fio, smaller experts, four in flight */
#define TARGET_CPU_S_GB 0.05   /* I/O thread CPU seconds per GB */
#define BIG_EXPERT (32ull << 20)

static double cpu_seconds(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static float rngf(uint64_t *s)
{
	return (float)((double)(bench_rng(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

/* 2 MiB aligned, huge pages advised and faulted in now, as a slot of the
 * engine's host cache is once it has been used: the benchmark measures
 * the steady state, not first-touch page faults. */
static void *xalloc(size_t bytes)
{
	size_t len = (bytes + HUGE_2M - 1) / HUGE_2M * HUGE_2M;
	void *p;

	if (posix_memalign(&p, HUGE_2M, len ? len : HUGE_2M)) {
		fprintf(stderr, "bench_pager: out of memory (%zu bytes)\n", bytes);
		exit(1);
	}
	madvise(p, len ? len : HUGE_2M, MADV_HUGEPAGE);
	memset(p, 0, len ? len : HUGE_2M);
	return p;
}

/* Drop the page cache if we may (root): true if it was dropped. */
static bool drop_caches(void)
{
	int fd;
	bool ok;

	sync();
	fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ok = write(fd, "3\n", 2) == 2;
	close(fd);
	return ok;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void pager_log(void *ctx, int level, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "bench_pager: pager %s: %s\n", level <= 3 ? "error" : level <= 4 ? "warning" : "info",
		msg);
}

static const char *ring_flags_name(uint32_t f, char *buf, size_t len)
{
	static const struct { uint32_t flag; const char *name; } names[] = {
#ifdef IORING_SETUP_SINGLE_ISSUER
		{ IORING_SETUP_SINGLE_ISSUER, "SINGLE_ISSUER" },
#endif
#ifdef IORING_SETUP_DEFER_TASKRUN
		{ IORING_SETUP_DEFER_TASKRUN, "DEFER_TASKRUN" },
#endif
#ifdef IORING_SETUP_COOP_TASKRUN
		{ IORING_SETUP_COOP_TASKRUN, "COOP_TASKRUN" },
#endif
		{ IORING_SETUP_SQPOLL, "SQPOLL" },
	};
	size_t o = 0;

	buf[0] = '\0';
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]) && o < len; i++)
		if (f & names[i].flag)
			o += (size_t)snprintf(buf + o, len - o, "%s%s", o ? "+" : "", names[i].name);
	if (!buf[0])
		snprintf(buf, len, "none");
	return buf;
}

/* ------------------------------------------------------------------------ */
/* paging                                                                    */

struct dest {
	struct moe_pager_load ld;
	const struct moe_model_config *cfg;
	void *mem;                  /* the expert in the CPU backend's layout */
};

/* The engine's sink (engine.c slot_sink): convert the chunk into place. */
static void prepare_sink(void *ctx, const void *chunk, uint64_t off, uint64_t len)
{
	struct dest *d = ctx;

	moe_backend_cpu_ops.blob_prepare_range(d->cfg, d->cfg->weight_dtype, d->cfg->moe_intermediate_size, chunk, off, len,
					       d->mem);
}

struct pass {
	double seconds;
	uint64_t bytes;             /* read from the store (pager stats) */
	double io_cpu;              /* I/O thread CPU seconds */
	double verify_cpu;          /* verify thread CPU seconds (hash and sink) */
	double proc_cpu;            /* process CPU seconds */
	struct moe_pager_stats st;
};

/*
 * Load experts keys[0..n) (li * E + e) with at most @w loads outstanding;
 * @dst[0..w) are the destinations.  A fresh pager for the pass.
 */
static int bandwidth_pass(const struct moe_store *s, const uint32_t *keys, uint32_t n, uint32_t w,
			  struct dest *dst, bool prepare, struct pass *res)
{
	struct moe_pager_options po = { .log = pager_log };
	struct moe_pager_load *act[MAX_WINDOW];
	struct moe_pager_stats st0, st1;
	struct moe_err err = { 0 };
	struct moe_pager *p;
	uint32_t E = s->cfg.num_experts, next = 0, nact = 0;
	double t0, c0;
	int r = 0;

	if (moe_pager_open(s, &po, &p, &err) < 0) {
		fprintf(stderr, "bench_pager: %s\n", err.msg);
		return -1;
	}
	moe_pager_get_stats(p, &st0);
	c0 = cpu_seconds();
	t0 = bench_now();
	for (; next < n && nact < w; next++, nact++) {
		struct dest *d = &dst[nact];

		d->ld = (struct moe_pager_load){ .li = keys[next] / E, .expert = keys[next] % E,
						 .sink = prepare ? prepare_sink : NULL, .sink_ctx = d };
		moe_pager_submit(p, &d->ld);
		act[nact] = &d->ld;
	}
	while (nact) {
		int i = moe_pager_wait_any(p, act, nact);
		struct moe_pager_load *ld;

		if (i < 0) {
			fprintf(stderr, "bench_pager: moe_pager_wait_any: %s\n", strerror(-i));
			r = -1;
			break;
		}
		ld = act[i];
		if (ld->status != 0) {
			fprintf(stderr, "bench_pager: %s\n", ld->msg[0] ? ld->msg : strerror(-ld->status));
			r = -1;
			break;
		}
		if (next < n) {
			/* the same destination takes the next expert, as a freed slot would */
			ld->li = keys[next] / E;
			ld->expert = keys[next] % E;
			next++;
			moe_pager_submit(p, ld);
		} else {
			act[i] = act[--nact];
		}
	}
	res->seconds = bench_now() - t0;
	res->proc_cpu = cpu_seconds() - c0;
	moe_pager_get_stats(p, &st1);
	moe_pager_close(p);
	res->bytes = st1.bytes - st0.bytes;
	res->io_cpu = (double)(st1.io_cpu_ns - st0.io_cpu_ns) * 1e-9;
	res->verify_cpu = (double)(st1.verify_cpu_ns - st0.verify_cpu_ns) * 1e-9;
	res->st = st1;
	return r;
}

/* The median of @n values (@v is reordered). */
static double median(double *v, uint32_t n)
{
	if (!n)
		return 0;
	qsort(v, n, sizeof(double), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Huge pages fio may take for its buffers: 32 x 1 MiB and its alignment. */
#define FIO_HUGE_PAGES 24

/*
 * Add @delta pages to the hugetlb pool (root only); returns the previous
 * size to put back, or -1 when we may not.
 */
static long hugepool_add(long delta)
{
	FILE *f = fopen("/proc/sys/vm/nr_hugepages", "r+");
	long old = -1;

	if (!f)
		return -1;
	if (fscanf(f, "%ld", &old) != 1 || fseek(f, 0, SEEK_SET) != 0 ||
	    fprintf(f, "%ld\n", old + delta) < 0 || fflush(f) != 0)
		old = -1;
	fclose(f);
	return old;
}

static void hugepool_set(long n)
{
	FILE *f = fopen("/proc/sys/vm/nr_hugepages", "w");

	if (f) {
		fprintf(f, "%ld\n", n);
		fclose(f);
	}
}

/*
 * The anchor: the issue's fio command on @path (@size bytes from the start,
 * the region the experts are read from), run by us so that it can go just
 * before each pass of the pager.  With @huge, fio's buffers are in huge
 * pages (--iomem=shmhuge) as the pager's staging is: on a virtual disk a
 * 1 MiB read into 4 KiB pages is 256 segments, more than a virtio queue
 * takes in one request.  Bandwidth in bytes/s and fio's CPU seconds per GB
 * (its usr + sys over its runtime) into *ret_bps, *ret_cpu.
 */
static int fio_run(const char *fio, const char *path, uint64_t size, bool huge, double *ret_bps,
		   double *ret_cpu)
{
	char fname[4200], sz[32], line[8192];
	size_t o = 0;
	int pfd[2];
	pid_t pid;

	/* fio splits --filename at ':' */
	o += (size_t)snprintf(fname, sizeof(fname), "--filename=");
	for (const char *c = path; *c && o + 3 < sizeof(fname); c++) {
		if (*c == ':')
			fname[o++] = '\\';
		fname[o++] = *c;
	}
	fname[o] = '\0';
	snprintf(sz, sizeof(sz), "--size=%" PRIu64, size);
	char *argv[] = { (char *)fio, "--name=anchor", "--readonly", "--rw=read", "--bs=1M",
			 "--iodepth=32", "--ioengine=io_uring", "--direct=1", fname, sz, "--minimal",
			 huge ? "--iomem=shmhuge" : NULL, NULL };
	if (pipe(pfd) < 0)
		return -errno;
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		dup2(pfd[1], 1);
		close(pfd[0]);
		close(pfd[1]);
		execvp(fio, argv);
		fprintf(stderr, "bench_pager: cannot run %s: %s\n", fio, strerror(errno));
		_exit(127);
	}
	close(pfd[1]);
	FILE *f = fdopen(pfd[0], "r");
	bool got = f && fgets(line, sizeof(line), f);
	if (f)
		fclose(f);
	else
		close(pfd[0]);
	int status;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!got || !WIFEXITED(status) || WEXITSTATUS(status))
		return -EIO;

	/* terse v3, ';'-separated: 6 read KiB, 7 read KiB/s, 9 runtime ms,
	 * 88 and 89 usr and sys CPU (percent) */
	double fld[90] = { 0 };
	char *save, *t = strtok_r(line, ";", &save);
	for (int i = 1; t && i < 90; i++, t = strtok_r(NULL, ";", &save))
		fld[i] = strtod(t, NULL);
	if (fld[7] <= 0 || fld[6] <= 0)
		return -EIO;
	*ret_bps = fld[7] * 1024;
	*ret_cpu = (fld[88] + fld[89]) / 100 * fld[9] / 1e3 / (fld[6] * 1024 / 1e9);
	return 0;
}

/* A way of loading (a row of the table): its passes, and the anchor of each. */
struct row {
	const char *what;
	uint32_t w;
	bool prepare;
	uint32_t n;
	double bw[MAX_REPS], ratio[MAX_REPS], ratio_huge[MAX_REPS];
	double io_cpu[MAX_REPS], verify_cpu[MAX_REPS], proc_cpu[MAX_REPS];
	struct moe_pager_stats st;
};

/* One expert on a fresh pager, submit to done: seconds (wall, from before
 * submit to after the wait) and the pager's own submit_ns..done_ns. */
static int cold_load(const struct moe_store *s, uint32_t key, struct dest *d, double *ret_wall,
		     double *ret_pager)
{
	struct moe_pager_options po = { .log = pager_log };
	struct moe_err err = { 0 };
	struct moe_pager *p;
	uint32_t E = s->cfg.num_experts;
	double t0, t1;
	int r;

	if (moe_pager_open(s, &po, &p, &err) < 0) {
		fprintf(stderr, "bench_pager: %s\n", err.msg);
		return -1;
	}
	usleep(20000);   /* let the I/O thread reach its wait: the pager is warm, the data cold */
	d->ld = (struct moe_pager_load){ .li = key / E, .expert = key % E, .sink = prepare_sink,
					 .sink_ctx = d };
	t0 = bench_now();
	moe_pager_submit(p, &d->ld);
	r = moe_pager_wait(p, &d->ld, &err);
	t1 = bench_now();
	if (r < 0)
		fprintf(stderr, "bench_pager: %s\n", err.msg);
	*ret_wall = t1 - t0;
	*ret_pager = (double)(d->ld.done_ns - d->ld.submit_ns) * 1e-9;
	moe_pager_close(p);
	return r < 0 ? -1 : 0;
}

/* CPU seconds per GB of XXH3 and of XXH3 + the layout conversion, over
 * @bytes of memory in pieces of one chunk, out of cache. */
static void cpu_floor(const struct moe_model_config *cfg, uint64_t expert_bytes, double *ret_hash,
		      double *ret_both)
{
	const uint64_t chunk = 1u << 20;
	uint64_t span = expert_bytes / chunk * chunk;   /* whole chunks of one expert */
	uint64_t copies = ((512ull << 20) + span - 1) / span;  /* well past the LLC */
	uint8_t *src = xalloc(span * copies);
	uint8_t *dst = xalloc(moe_backend_cpu_ops.blob_bytes(cfg, cfg->weight_dtype, cfg->moe_intermediate_size));
	volatile uint64_t sink = 0;
	uint64_t seed = 5;
	double best_h = 1e9, best_b = 1e9;

	for (uint64_t i = 0; i < span * copies; i += 8)
		*(uint64_t *)(src + i) = bench_rng(&seed) & 0x3fff3fff3fff3fffull;  /* finite bf16/f16 */
	for (int rep = 0; rep < 3; rep++) {
		double c0 = bench_now();
		for (uint64_t i = 0; i < span * copies; i += chunk)
			sink += moe_store_checksum(src + i, chunk);
		double h = bench_now() - c0;
		c0 = bench_now();
		for (uint64_t c = 0; c < copies; c++)
			for (uint64_t o = 0; o < span; o += chunk) {
				const uint8_t *b = src + c * span + o;
				sink += moe_store_checksum(b, chunk);
				moe_backend_cpu_ops.blob_prepare_range(cfg, cfg->weight_dtype, cfg->moe_intermediate_size, b, o, chunk, dst);
			}
		double both = bench_now() - c0;
		if (h < best_h)
			best_h = h;
		if (both < best_b)
			best_b = both;
	}
	(void)sink;
	free(src);
	free(dst);
	*ret_hash = best_h / ((double)(span * copies) / 1e9);
	*ret_both = best_b / ((double)(span * copies) / 1e9);
}

/* A pass's anchors: fio's bandwidth with plain and huge-page buffers (0: none). */
struct anchors {
	const char *fio;            /* the fio program, or NULL */
	bool huge;                  /* also with huge-page buffers */
	uint32_t n, nh;
	double bw[3 * MAX_REPS], cpu[3 * MAX_REPS];
	double hbw[3 * MAX_REPS], hcpu[3 * MAX_REPS];
};

/* Run the anchors once before a pass; 0, or -1 with a message. */
static int anchors_run(struct anchors *a, const char *path, uint64_t size, double *ret_bw,
		       double *ret_hbw)
{
	int rc;

	*ret_bw = *ret_hbw = 0;
	if (!a->fio)
		return 0;
	drop_caches();
	rc = fio_run(a->fio, path, size, false, &a->bw[a->n], &a->cpu[a->n]);
	if (rc < 0) {
		fprintf(stderr, "bench_pager: %s on %s failed (%s)\n", a->fio, path, strerror(-rc));
		return -1;
	}
	*ret_bw = a->bw[a->n++];
	if (a->huge) {
		/* the pool only while fio runs, so the pager meets the system as it is */
		long old = hugepool_add(FIO_HUGE_PAGES);

		if (old < 0) {
			fprintf(stderr, "bench_pager: cannot reserve huge pages for fio (not root?): "
				"no huge-page anchor\n");
			a->huge = false;
			return 0;
		}
		drop_caches();
		rc = fio_run(a->fio, path, size, true, &a->hbw[a->nh], &a->hcpu[a->nh]);
		hugepool_set(old);
		if (rc < 0) {
			fprintf(stderr, "bench_pager: %s --iomem=shmhuge on %s failed (%s): no huge-page anchor\n",
				a->fio, path, strerror(-rc));
			a->huge = false;
			return 0;
		}
		*ret_hbw = a->hbw[a->nh++];
	}
	return 0;
}

static void minmax(const double *v, uint32_t n, double *ret_min, double *ret_max)
{
	*ret_min = *ret_max = n ? v[0] : 0;
	for (uint32_t i = 1; i < n; i++) {
		*ret_min = v[i] < *ret_min ? v[i] : *ret_min;
		*ret_max = v[i] > *ret_max ? v[i] : *ret_max;
	}
}

static int run_paging(const char *path, const char *name, uint32_t w, uint64_t cap_mb,
		      const char *fio_cmd, bool fio_huge, double fio_fixed, bool quick)
{
	struct moe_err err = { 0 };
	struct moe_store *s;
	char flags[96];

	if (moe_store_open(path, &s, &err) < 0) {
		fprintf(stderr, "bench_pager: %s\n", err.msg);
		return 1;
	}
	const struct moe_model_config *cfg = &s->cfg;
	uint32_t E = cfg->num_experts, L = s->hdr.num_moe_layers;
	uint64_t eb = s->hdr.expert_bytes;
	uint64_t total = (uint64_t)E * L, n = total;
	uint64_t dbytes = moe_backend_cpu_ops.blob_bytes(cfg, cfg->weight_dtype, cfg->moe_intermediate_size);
	uint32_t reps = quick ? 1 : 5, ncold = quick ? 3 : 7;
	bool dropped = drop_caches();

	if (cap_mb && n * eb > cap_mb * 1000000ull)
		n = cap_mb * 1000000ull / eb;
	if (n < 1)
		n = 1;
	if (n > UINT32_MAX)
		n = UINT32_MAX;
	uint32_t *keys = malloc(n * sizeof(uint32_t));
	struct dest *dst = calloc(w, sizeof(*dst));
	struct anchors *an = calloc(1, sizeof(*an));
	if (!keys || !dst || !an) {
		fprintf(stderr, "bench_pager: out of memory\n");
		return 1;
	}
	for (uint32_t i = 0; i < n; i++)
		keys[i] = i;       /* store order: the pattern fio reads in */
	for (uint32_t i = 0; i < w; i++) {
		dst[i].cfg = cfg;
		dst[i].mem = xalloc(dbytes);
	}
	an->fio = fio_cmd;
	an->huge = fio_huge;
	/* fio reads the file from the start to the end of the last expert read */
	uint64_t last = n - 1;
	uint64_t fio_size = moe_store_expert_offset(s, (uint32_t)(last / E), (uint32_t)(last % E)) + eb;
	fio_size = (fio_size + (1u << 20) - 1) >> 20 << 20;
	if (fio_size > s->hdr.file_size)
		fio_size = s->hdr.file_size;

	printf("\n%s: %s\n", name, path);
	printf("  %s, %u MoE layer%s x %u experts of %.1f MB (%u x %u), store %.2f GB\n",
	       s->hdr.model_type, L, L == 1 ? "" : "s", E, (double)eb / 1e6, cfg->hidden_size,
	       cfg->moe_intermediate_size, (double)s->hdr.file_size / 1e9);
	fflush(stdout);

	/*
	 * Rounds of: for each row, fio then one pass of the pager, so that
	 * each pass has its own anchor measured seconds before and a drift of
	 * the shared disk hits every row alike.  Figures are medians.
	 */
	struct row rows[3] = {
		{ .what = "pager, prepare sink (the engine's)", .w = w, .prepare = true },
		{ .what = "pager, hash only (no sink)", .w = w, .prepare = false },
		{ .what = "pager, prepare sink", .w = 1, .prepare = true },
	};
	uint32_t nrows = w == 1 ? 2 : 3;
	for (uint32_t rep = 0; rep < reps; rep++)
		for (uint32_t ri = 0; ri < nrows; ri++) {
			struct row *r = &rows[ri];
			struct pass ps;
			double a = fio_fixed, ah = 0;

			if (an->fio && anchors_run(an, path, fio_size, &a, &ah) < 0)
				return 1;
			drop_caches();   /* matters only where O_DIRECT is refused */
			if (bandwidth_pass(s, keys, (uint32_t)n, r->w, dst, r->prepare, &ps) < 0)
				return 1;
			double gb = (double)ps.bytes / 1e9;
			r->bw[r->n] = (double)ps.bytes / ps.seconds;
			r->ratio[r->n] = a > 0 ? r->bw[r->n] / a : 0;
			r->ratio_huge[r->n] = ah > 0 ? r->bw[r->n] / ah : 0;
			r->io_cpu[r->n] = ps.io_cpu / gb;
			r->verify_cpu[r->n] = ps.verify_cpu / gb;
			r->proc_cpu[r->n] = ps.proc_cpu / gb;
			r->n++;
			r->st = ps.st;
		}

	const struct moe_pager_stats *st = &rows[0].st;
	printf("  pager: queue depth 32, 1024 KiB chunks, O_DIRECT %s (statx dio align: memory %u, offset %u), "
	       "staging %" PRIu64 " MiB in huge pages %s, ring %s\n",
	       st->direct ? "yes" : "no", st->dio_mem_align, st->dio_offset_align, st->staging_bytes >> 20,
	       st->hugepages ? "yes" : "no", ring_flags_name(st->ring_flags, flags, sizeof(flags)));
	printf("  page cache %s before each pass%s\n", dropped ? "dropped" : "NOT dropped (not root)",
	       st->direct ? " (O_DIRECT reads bypass it anyway; the host's cache of a virtual disk "
			    "cannot be dropped from here)" : "");

	double fio = fio_fixed, fcpu = -1, fmin, fmax, hfio = 0, hcpu = -1, hmin, hmax;
	minmax(an->bw, an->n, &fmin, &fmax);
	minmax(an->hbw, an->nh, &hmin, &hmax);
	if (an->n) {
		double tmp[3 * MAX_REPS];

		memcpy(tmp, an->bw, an->n * sizeof(double));
		fio = median(tmp, an->n);
		fcpu = median(an->cpu, an->n);
	}
	if (an->nh) {
		double tmp[3 * MAX_REPS];

		memcpy(tmp, an->hbw, an->nh * sizeof(double));
		hfio = median(tmp, an->nh);
		hcpu = median(an->hcpu, an->nh);
	}
	bool huge = an->nh == an->n && an->nh > 0;
	double target = eb >= BIG_EXPERT ? TARGET_BIG : TARGET_SMALL;
	printf("  %u experts (%.2f GB) per pass; %u round%s of fio then the pager for each row; medians:\n",
	       (uint32_t)n, (double)n * eb / 1e9, reps, reps == 1 ? "" : "s");
	printf("    %-42s %6s %5s %8s %9s  %8s %7s %8s %8s\n", "", "MB/s", "/fio", "target", "/fio-huge",
	       "I/O-thr", "target", "verify", "process");
	printf("    %-42s %6s %5s %8s %9s  %8s %7s %8s %8s\n", "", "", "", "", "", "CPU-s/GB", "", "CPU-s/GB",
	       "CPU-s/GB");
	if (an->n)
		printf("    %-42s %6.0f %5.2f %8s %9s  %8s %7s %8s %8.3f\n", "fio (the issue's command)", fio / 1e6,
		       1.0, "", "", "", "", "", fcpu);
	else if (fio > 0)
		printf("    %-42s %6.0f %5.2f\n", "fio (given with -f)", fio / 1e6, 1.0);
	if (huge)
		printf("    %-42s %6.0f %5s %8s %9.2f  %8s %7s %8s %8.3f\n", "fio, huge-page buffers (--iomem=shmhuge)",
		       hfio / 1e6, "", "", 1.0, "", "", "", hcpu);
	double bw[3], ratio[3], ratio_h[3], iocpu[3], vcpu[3], pcpu[3];
	for (uint32_t i = 0; i < nrows; i++) {
		struct row *r = &rows[i];
		char what[64], rs[16] = "-", rh[16] = "-", tg[16] = "", ctg[16] = "";

		bw[i] = median(r->bw, r->n);
		ratio[i] = median(r->ratio, r->n);
		ratio_h[i] = median(r->ratio_huge, r->n);
		iocpu[i] = median(r->io_cpu, r->n);
		vcpu[i] = median(r->verify_cpu, r->n);
		pcpu[i] = median(r->proc_cpu, r->n);
		snprintf(what, sizeof(what), "%s, W=%u", r->what, r->w);
		if (fio > 0)
			snprintf(rs, sizeof(rs), "%.2f", ratio[i]);
		if (huge)
			snprintf(rh, sizeof(rh), "%.2f", ratio_h[i]);
		if (i == 0) {
			snprintf(tg, sizeof(tg), ">= %.2f", target);
			snprintf(ctg, sizeof(ctg), "<= %.2f", TARGET_CPU_S_GB);
		}
		printf("    %-42s %6.0f %5s %8s %9s  %8.3f %7s %8.3f %8.3f\n", what, bw[i] / 1e6, rs, tg, rh,
		       iocpu[i], ctg, vcpu[i], pcpu[i]);
	}
	if (an->n > 1)
		printf("    fio ranged %.0f..%.0f MB/s over its %u runs; each /fio is the median over the passes\n"
		       "    of the pass's bandwidth over the fio run just before it\n", fmin / 1e6, fmax / 1e6,
		       an->n);
	if (huge && an->nh > 1)
		printf("    fio with huge-page buffers ranged %.0f..%.0f MB/s\n", hmin / 1e6, hmax / 1e6);

	double fh, fb;
	cpu_floor(cfg, eb, &fh, &fb);
	printf("    CPU anchors (same run, one core, 512 MB out of cache, 1 MiB pieces): XXH3 %.3f s/GB, "
	       "XXH3 + prepare %.3f s/GB\n", fh, fb);

	/* single cold expert: experts far apart, never two of one layer in a row */
	double walls[16], pagers[16];
	bool cold_dropped = true;
	for (uint32_t i = 0; i < ncold; i++) {
		uint32_t key = (uint32_t)(((uint64_t)(2 * i + 1) * total) / (2 * ncold));
		cold_dropped &= drop_caches();
		if (cold_load(s, key, &dst[0], &walls[i], &pagers[i]) < 0)
			return 1;
	}
	double cmin, cmax;
	minmax(walls, ncold, &cmin, &cmax);
	double cold = median(walls, ncold), cold_pager = median(pagers, ncold);
	double best = huge && hfio > fio ? hfio : fio;
	double ideal = best > 0 ? (double)eb / best : 0;
	printf("  cold single expert (%u experts, each on a fresh pager, page cache %s, O_DIRECT %s, prepare sink):\n"
	       "    median %.2f ms submit to wait's return (pager's submit_ns..done_ns %.2f ms; range %.2f..%.2f ms)\n",
	       ncold, cold_dropped ? "dropped" : "not dropped", st->direct ? "yes" : "no", cold * 1e3,
	       cold_pager * 1e3, cmin * 1e3, cmax * 1e3);
	if (best > 0)
		printf("    ideal (its bytes at the better fio median, %.0f MB/s) %.2f ms: ideal/measured %.2f\n",
		       best / 1e6, ideal * 1e3, ideal / cold);

	/* one row for the summary table of bench/run-pager (markdown) */
	char r1[24] = "-", r2[16] = "-", rh[16] = "-", r3[16] = "-", fios[16] = "-", hfios[16] = "-",
	     ideals[16] = "-";
	if (fio > 0) {
		snprintf(fios, sizeof(fios), "%.0f", fio / 1e6);
		snprintf(r1, sizeof(r1), "%.2f (>= %.2f)", ratio[0], target);
		snprintf(r2, sizeof(r2), "%.2f", ratio[1]);
		snprintf(ideals, sizeof(ideals), "%.2f", ideal * 1e3);
		snprintf(r3, sizeof(r3), "%.2f", ideal / cold);
	}
	if (huge) {
		snprintf(hfios, sizeof(hfios), "%.0f", hfio / 1e6);
		snprintf(rh, sizeof(rh), "%.2f", ratio_h[0]);
	}
	printf("summary: | %s | %.1f | %u | %u | %s | %s | %.0f | %s | %s | %.0f | %s | %.3f | %.3f | %.3f | %.2f | %s | %s | %s | %s | %s |\n",
	       name, (double)eb / 1e6, (uint32_t)n, w, fios, hfios, bw[0] / 1e6, r1, rh, bw[1] / 1e6, r2,
	       iocpu[0], vcpu[0], pcpu[0], cold * 1e3, ideals, r3, st->direct ? "yes" : "no",
	       st->hugepages ? "yes" : "no", ring_flags_name(st->ring_flags, flags, sizeof(flags)));
	fflush(stdout);

	for (uint32_t i = 0; i < w; i++)
		free(dst[i].mem);
	free(dst);
	free(keys);
	free(an);
	moe_store_close(s);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* hit rates                                                                 */

/* A trace of @batches batches of @tokens random tokens through every MoE
 * layer: keys as moe_cache_simulate takes them, into *ret_keys. */
static int record_trace(struct moe_engine *e, uint32_t tokens, uint32_t batches, uint64_t seed,
			uint32_t **ret_keys, size_t *ret_n)
{
	const struct moe_model_config *cfg = moe_engine_config(e);
	const struct moe_store *s = moe_engine_store(e);
	uint32_t H = cfg->hidden_size, E = cfg->num_experts, k = cfg->top_k, L = s->hdr.num_moe_layers;
	size_t cap = (size_t)batches * L * ((size_t)(tokens * k < E ? tokens * k : E) + 1), n = 0;
	uint32_t *keys = malloc(cap * sizeof(uint32_t));
	float *x = malloc((size_t)tokens * H * sizeof(float)), *h = malloc((size_t)tokens * H * sizeof(float));
	float *out = malloc((size_t)tokens * H * sizeof(float));
	int32_t *ids = malloc((size_t)tokens * k * sizeof(int32_t));
	uint8_t *seen = malloc(E);
	struct moe_err err = { 0 };

	if (!keys || !x || !h || !out || !ids || !seen) {
		fprintf(stderr, "bench_pager: out of memory\n");
		return -1;
	}
	for (uint32_t b = 0; b < batches; b++) {
		for (size_t i = 0; i < (size_t)tokens * H; i++)
			x[i] = rngf(&seed);
		for (uint32_t li = 0; li < L; li++) {
			/* RMS-normalised input, as the model's pre-MoE norm gives it */
			for (uint32_t t = 0; t < tokens; t++) {
				const float *xt = x + (size_t)t * H;
				double ss = 0;
				for (uint32_t i = 0; i < H; i++)
					ss += (double)xt[i] * xt[i];
				float sc = (float)(1.0 / sqrt(ss / H + 1e-6));
				for (uint32_t i = 0; i < H; i++)
					h[(size_t)t * H + i] = xt[i] * sc;
			}
			if (moe_engine_forward(e, s->layers[li].layer, h, tokens, out, ids, NULL, 0, &err) < 0) {
				fprintf(stderr, "bench_pager: %s\n", err.msg);
				return -1;
			}
			for (size_t i = 0; i < (size_t)tokens * H; i++)
				x[i] += out[i];
			memset(seen, 0, E);
			for (size_t i = 0; i < (size_t)tokens * k; i++)
				if (ids[i] >= 0 && (uint32_t)ids[i] < E && !seen[ids[i]]) {
					seen[ids[i]] = 1;
					keys[n++] = li * E + (uint32_t)ids[i];
				}
			keys[n++] = MOE_CACHE_NONE;
		}
	}
	free(x);
	free(h);
	free(out);
	free(ids);
	free(seen);
	*ret_keys = keys;
	*ret_n = n;
	return 0;
}

static int run_hits(const char *path, bool quick)
{
	static const uint32_t pcts[] = { 5, 10, 25, 50 };
	static const uint32_t token_counts[] = { 1, 4, 16 };
	struct moe_engine_options eo = { .backend = "cpu", .log = pager_log };
	struct moe_err err = { 0 };
	struct moe_engine *e;

	if (moe_engine_open(path, &eo, &e, &err) < 0) {
		fprintf(stderr, "bench_pager: %s\n", err.msg);
		return 1;
	}
	const struct moe_model_config *cfg = moe_engine_config(e);
	const struct moe_store *s = moe_engine_store(e);
	uint32_t E = cfg->num_experts, L = s->hdr.num_moe_layers, total = E * L;
	uint32_t batches = quick ? 64 : 1024;

	printf("\nHit rates: %s\n", path);
	printf("  %s, %u MoE layers x %u experts, top-%u, hidden %u; random batches through every MoE layer\n"
	       "  of a residual stream (x += layer(rmsnorm(x))), keys from the routing ids; the policies\n"
	       "  simulated on that trace with moe_cache_simulate (freq = the engine's default policy)\n",
	       s->hdr.model_type, L, E, cfg->top_k, cfg->hidden_size);
	for (size_t ti = 0; ti < sizeof(token_counts) / sizeof(token_counts[0]); ti++) {
		uint32_t tokens = token_counts[ti];
		uint32_t *keys;
		size_t n;

		if (record_trace(e, tokens, batches, 77 + ti, &keys, &n) < 0)
			return 1;
		/* how skewed the routing came out: the hottest expert's share */
		uint64_t *cnt = calloc(total, sizeof(uint64_t)), uses = 0, mx = 0;
		if (!cnt) {
			fprintf(stderr, "bench_pager: out of memory\n");
			return 1;
		}
		for (size_t i = 0; i < n; i++)
			if (keys[i] != MOE_CACHE_NONE) {
				cnt[keys[i]]++;
				uses++;
			}
		for (uint32_t i = 0; i < total; i++)
			if (cnt[i] > mx)
				mx = cnt[i];
		printf("\n  %u token%s per batch, %u batches, %" PRIu64 " expert uses; the hottest expert used "
		       "%.1fx the mean\n", tokens, tokens == 1 ? "" : "s", batches, uses,
		       (double)mx * total / (double)uses);
		free(cnt);
		printf("    %9s %6s %8s %8s %8s %9s %12s\n", "capacity", "slots", "LRU", "freq", "Belady",
		       "freq/LRU", "freq/Belady");
		for (size_t pi = 0; pi < sizeof(pcts) / sizeof(pcts[0]); pi++) {
			uint32_t slots = total * pcts[pi] / 100;
			double hr[3];

			if (slots < 1)
				slots = 1;
			for (int pol = 0; pol < 3; pol++) {
				struct moe_cache_stats cs;
				static const enum moe_cache_policy pols[] = { MOE_CACHE_LRU, MOE_CACHE_FREQ,
									    MOE_CACHE_BELADY };

				if (moe_cache_simulate(keys, n, L, E, slots, pols[pol], &cs, &err) < 0) {
					fprintf(stderr, "bench_pager: moe_cache_simulate: %s\n", err.msg);
					return 1;
				}
				hr[pol] = cs.hits + cs.misses ? (double)cs.hits / (double)(cs.hits + cs.misses) : 0;
			}
			char fl[16] = "-", fb[16] = "-";   /* a ratio to a hit rate of 0 is none */

			if (hr[0] > 0)
				snprintf(fl, sizeof(fl), "%.2f", hr[1] / hr[0]);
			if (hr[2] > 0)
				snprintf(fb, sizeof(fb), "%.2f", hr[1] / hr[2]);
			printf("    %8u%% %6u %8.3f %8.3f %8.3f %9s %12s\n", pcts[pi], slots, hr[0], hr[1], hr[2],
			       fl, fb);
		}
		free(keys);
	}
	printf("\n  (the experts of one layer's batch are held together, so a tier that cannot keep one\n"
	       "  round of every layer's experts makes LRU evict each just before its reuse: 0)\n");
	moe_engine_close(e);
	return 0;
}

/* ------------------------------------------------------------------------ */

/* A numeric option in [lo, hi], or exit with a message. */
static double num_arg(char opt, const char *s, double lo, double hi)
{
	char *end;
	double v = strtod(s, &end);

	if (*s == '\0' || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, "bench_pager: -%c: expected a number in %g..%g, got '%s'\n", opt, lo, hi, s);
		exit(2);
	}
	return v;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: bench_pager [-w LOADS] [-b MB] [-F FIO [-G] | -f FIO_MBPS] [-n NAME] [-q] STORE\n"
		   "       bench_pager -H [-q] STORE\n"
		   "  -w LOADS   loads outstanding (1..%d, default 4)\n"
		   "  -b MB      read at most MB megabytes of experts per pass (default: all)\n"
		   "  -F FIO     run FIO (the fio program) on STORE before each pass: the anchor\n"
		   "             of the ratios (io_uring, O_DIRECT, 1 MiB blocks, depth 32)\n"
		   "  -G         and again with its buffers in huge pages (--iomem=shmhuge), as the\n"
		   "             pager's are: a second, stricter anchor (root: the hugetlb pool\n"
		   "             grows by %d pages while that fio runs)\n"
		   "  -f MBPS    or take this fio bandwidth as the anchor\n"
		   "  -n NAME    what to call the store in the output\n"
		   "  -H         hit rates of the eviction policies on a routing trace of STORE\n"
		   "  -q         quick: one pass, fewer cold loads and batches\n", MAX_WINDOW, FIO_HUGE_PAGES);
}

int main(int argc, char **argv)
{
	uint32_t w = 4;
	uint64_t cap_mb = 0;
	double fio = 0;
	const char *fio_cmd = NULL;
	bool fio_huge = false;
	const char *name = NULL;
	bool quick = false, hits = false;
	int opt;

	while ((opt = getopt(argc, argv, "w:b:f:F:Gn:Hqh")) != -1) {
		switch (opt) {
		case 'w': w = (uint32_t)num_arg('w', optarg, 1, MAX_WINDOW); break;
		case 'b': cap_mb = (uint64_t)num_arg('b', optarg, 1, 1e9); break;
		case 'f': fio = num_arg('f', optarg, 0, 1e9); break;
		case 'F': fio_cmd = optarg; break;
		case 'G': fio_huge = true; break;
		case 'n': name = optarg; break;
		case 'H': hits = true; break;
		case 'q': quick = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind != argc - 1) {
		usage(stderr);
		return 2;
	}
	if (hits)
		return run_hits(argv[optind], quick);
	if (fio_cmd && fio > 0) {
		fprintf(stderr, "bench_pager: -f and -F: one anchor or the other\n");
		return 2;
	}
	return run_paging(argv[optind], name ? name : argv[optind], w, cap_mb, fio_cmd, fio_huge, fio * 1e6, quick);
}
