/* SPDX-License-Identifier: MIT */
/*
 * libmoeclient: the client library of moed.
 *
 * A process connects to moed's unix socket, gets a shared-memory segment
 * (an arena for its tensors and a pair of rings), places hidden states in
 * the arena, submits requests and waits for their completions; or calls
 * moe_client_forward(), which does all of that with copies.  See
 * libmoeclient(3).
 *
 * Every function returns 0 or a positive value on success and a negative
 * errno (or -MOE_E_*) on failure; the library never logs, never exits and
 * never raises signals.  A handle may be used from several threads: the
 * calls on it are serialised where they must be (see libmoeclient(3),
 * THREAD SAFETY); one handle per thread avoids the waiting.
 */
#ifndef MOECLIENT_H
#define MOECLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this header; moe_version() tells the library's. */
#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

/*
 * Errors specific to moed, beyond the errno values (returned negated like
 * them).  Their values sit above every errno Linux defines.
 */
enum moe_error {
	MOE_E_BASE = 4096,
	MOE_E_PROTO = 4096,       /* the peer spoke an unknown protocol version */
	MOE_E_LAYER = 4097,       /* not an MoE layer of the served model */
	MOE_E_CHECKSUM = 4098,    /* a weight blob failed its checksum */
	MOE_E_MAX
};

/*
 * A static, human-readable message for @err, a negative errno or -MOE_E_*
 * (positive values are accepted too).  Never NULL; thread-safe.
 */
const char *moe_strerror(int err);

/*
 * Why the calling thread's last failed moe_client_connect(),
 * moe_client_submit() or moe_client_forward() failed, in words for a
 * person: for a connect, the socket, the cause and what to do (start moed,
 * join the socket's group, ...), or moed's own reason when it refused the
 * client; for a layer that is not served, the layers that are.  Those
 * three calls set it or, when the status says all there is, empty it;
 * other calls leave it alone.  One text per thread, valid until that
 * thread's next such call.  Never NULL.
 */
const char *moe_client_last_error(void);

/* The library's version as MAJOR * 10000 + MINOR * 100 + PATCH. */
int moe_version(void);

/* The socket moed listens on unless told otherwise; $MOED_SOCKET overrides it. */
#define MOE_DEFAULT_SOCKET "/run/moed/moed.sock"

/* Activation dtypes of a request. */
enum moe_dtype_act {
	MOE_F32 = 0,        /* float32 */
	MOE_BF16 = 1,       /* bfloat16 (uint16_t words) */
};

struct moe_client;          /* a session with moed */

struct moe_client_options {
	uint64_t arena_bytes;   /* shared arena wanted; 0: the daemon's default */
	uint32_t sq_entries;    /* requests in flight, a power of two; 0: default (64) */
	uint32_t reserved[5];   /* zero */
};

/* What moed serves. */
struct moe_model_info {
	char model_type[32];            /* "deepseek_v3", ... */
	char backend[16];               /* "cpu", "cuda" */
	uint32_t hidden_size;
	uint32_t moe_intermediate_size;
	uint32_t num_experts;
	uint32_t top_k;
	uint32_t num_hidden_layers;
	uint32_t num_moe_layers;
	const uint32_t *moe_layers;     /* [num_moe_layers], the checkpoint's numbers;
					 * valid until moe_client_disconnect() */
	uint32_t weight_dtype;          /* 0 float32, 1 bfloat16, 2 float16, 3 float8 e4m3
					 * with 128x128 block scales, 4 mxfp4 (e2m1 with
					 * an E8M0 scale per 32), 5 int4 in groups (as
					 * moe-store(5)) */
	uint32_t n_shared_experts;
	uint32_t max_tokens;            /* tokens per request: moed's limit, lowered to
					 * what this session's arena holds */
	uint64_t arena_bytes;           /* the session's arena */
};

/* A request: the tensors live in the arena (moe_client_alloc). */
struct moe_request {
	uint32_t layer;                 /* an MoE layer, the checkpoint's number */
	uint32_t dtype;                 /* enum moe_dtype_act of input and output */
	uint64_t tokens;                /* 1..max_tokens */
	const void *input;              /* [tokens][hidden_size] */
	void *output;                   /* [tokens][hidden_size] */
	int32_t *ids;                   /* [tokens][top_k] chosen experts, or NULL */
	float *weights;                 /* [tokens][top_k] their weights; both or neither */
	uint64_t user_data;             /* given back in the completion */
};

struct moe_completion {
	uint64_t user_data;
	int res;                        /* 0, or a negative errno / -MOE_E_* */
};

/*
 * Connect to moed at @socket_path (NULL: $MOED_SOCKET, else
 * MOE_DEFAULT_SOCKET) and set up the session's segment.  @opt may be NULL.
 * Errors: -ENOENT / -ECONNREFUSED (no moed there), -ENAMETOOLONG, -EACCES
 * (the socket's permissions or moed's access lists refuse this user),
 * -EUSERS (moed serves its maximum of clients), -EINVAL (@ret NULL, or
 * sq_entries not a power of two up to 4096), -E2BIG / -ENOSPC (the arena
 * asked for does not fit moed's limits.segment_mb), -MOE_E_PROTO,
 * -ETIMEDOUT, -ECONNRESET / -EPIPE (moed went away), -ENOMEM.  *ret is
 * set only on success.
 */
int moe_client_connect(const char *socket_path, const struct moe_client_options *opt,
		       struct moe_client **ret);

/* End the session: requests in flight are abandoned, the arena is gone.
 * NULL is fine. */
void moe_client_disconnect(struct moe_client *c);

/* The model and the session's limits, into *ret. */
int moe_client_info(struct moe_client *c, struct moe_model_info *ret);

/*
 * @bytes of the arena, 64-byte aligned, into *ret; -ENOMEM when the arena
 * has no room, -EINVAL for 0 bytes or NULL.  Free with moe_client_free().
 */
int moe_client_alloc(struct moe_client *c, size_t bytes, void **ret);

/* Give back what moe_client_alloc() gave; NULL is fine; -EINVAL for any
 * other pointer; -ENOMEM (the block stays lost until disconnect) when the
 * free list cannot grow. */
int moe_client_free(struct moe_client *c, void *p);

/*
 * Queue @req.  Errors: -EFAULT (a tensor not inside the arena, or not
 * aligned to its element size), -EINVAL
 * (NULL, dtype, ids without weights or weights without ids, bit 63 of
 * user_data set: that bit is moe_client_forward's), -E2BIG (tokens 0 or
 * beyond max_tokens),
 * -MOE_E_LAYER (not an MoE layer), -EAGAIN (the ring is full: reap
 * completions first), -ESHUTDOWN / -ECONNRESET (moed stopped or the
 * session ended).  The tensors must stay untouched until the completion.
 */
int moe_client_submit(struct moe_client *c, const struct moe_request *req);

/*
 * Queue a request that does nothing: it completes with res 0 and
 * @user_data as soon as moed looks at the ring (a health check, and the
 * measure of a ring round trip).  Errors as moe_client_submit().
 */
int moe_client_nop(struct moe_client *c, uint64_t user_data);

/*
 * The next completion of moe_client_submit() or moe_client_nop() into
 * *ret, waiting at most @timeout_ms (negative: no limit; 0: do not wait).  Returns 0 with *ret set (its res says how the
 * request went), -ETIMEDOUT (-EAGAIN with 0), -ESHUTDOWN / -ECONNRESET,
 * -MOE_E_PROTO (the completion ring's index is corrupt), -ENOMEM.
 */
int moe_client_wait(struct moe_client *c, struct moe_completion *ret, int timeout_ms);

/*
 * Run MoE layer @layer on @tokens rows of @input (any memory; @dtype),
 * writing @output and, if not NULL, @ids and @weights ([tokens][top_k]):
 * copies through the arena, in pieces if needed, and waits.  The output
 * bits are those of the same tokens in any other batch.  Returns 0 or the
 * error of moe_client_submit() or of the request.
 */
int moe_client_forward(struct moe_client *c, uint32_t layer, uint32_t dtype, const void *input,
		       void *output, uint64_t tokens, int32_t *ids, float *weights);

/*
 * moed's figures as a JSON text (the daemon's load, cache and pager
 * figures, latency percentiles, per-client counters) into *ret, which the
 * caller frees with free().
 */
int moe_client_stats(struct moe_client *c, char **ret);

/*
 * Which checkpoint a store was packed from, so that a process that runs the
 * rest of a model can check that moed serves the same one.  A fingerprint
 * is 32 lowercase hex digits (XXH3-128 of a canonical stream: config.json,
 * then each *.safetensors file's name, size, header and 256 evenly spaced
 * 4 KiB samples of its data; moe_checkpoint_fingerprint(3) defines it).
 * It is cheap (about 1 MiB read per file) and tells apart any two
 * checkpoints that differ in config.json, in a file's name, size or
 * header, or in a sampled byte; one altered only between samples is not
 * told apart.
 */
#define MOE_FINGERPRINT_LEN 33   /* 32 lowercase hex digits and the NUL */

/*
 * The fingerprint of the checkpoint directory @dir as moectl pack records
 * it, into @out (set only on success).  Errors: -ENOENT (@dir or its
 * config.json missing), -ENOTDIR, -EACCES, -ENODATA (no *.safetensors
 * file: the fingerprint is not defined there), -EINVAL (a *.safetensors
 * file too short for its header, or a header length past the file or over
 * 100 MB; config.json not a regular file; NULL arguments), -EFBIG
 * (config.json over 16 MiB), -EIO (a file changed while read), -ENOMEM.  Reads only; thread-safe; no session
 * needed.
 */
int moe_checkpoint_fingerprint(const char *dir, char out[MOE_FINGERPRINT_LEN]);

/*
 * The fingerprint of the checkpoint the served store was packed from, into
 * @out (set only on success).  -ENODATA when there is none to give: the
 * store records none (packed before fingerprints, or by a writer that had
 * none), or moed predates fingerprints; -EINVAL for NULL arguments.
 */
int moe_client_fingerprint(struct moe_client *c, char out[MOE_FINGERPRINT_LEN]);

/*
 * Hidden states that live in GPU memory (moed on the CUDA backend): no copy
 * through host memory.  moe_client_cuda_register() lets moed map [dev_ptr,
 * dev_ptr + bytes) of the calling process's CUDA memory (cudaMalloc'ed;
 * the calling thread's CUDA context current), through a CUDA IPC handle
 * passed over the session's socket, and gives the region's number; at most
 * MOE_CUDA_MAX_REGIONS per session.  Errors: -ENODEV (no CUDA driver in
 * this process), -EFAULT (not CUDA device memory of the current context,
 * or the range exceeds its allocation), -EOPNOTSUPP (moed runs on the CPU
 * backend, or the allocation cannot be shared), -ENOSPC (regions used up),
 * -EINVAL, -ECONNRESET / -EPIPE, -MOE_E_PROTO.
 */
#define MOE_CUDA_MAX_REGIONS 16
int moe_client_cuda_register(struct moe_client *c, void *dev_ptr, size_t bytes, uint32_t *region);

/* Let moed unmap @region (after the request running on it). */
int moe_client_cuda_unregister(struct moe_client *c, uint32_t region);

/*
 * As moe_client_forward() with float32 @input and @output in registered
 * device memory (each within one region, 4-byte aligned); @ids and
 * @weights, if not NULL, in host memory.  moed runs such a request alone,
 * not batched with other requests.  Errors: those of moe_client_forward(),
 * and -EFAULT (@input or @output not inside a registered region).
 */
int moe_client_forward_cuda(struct moe_client *c, uint32_t layer, const float *input, float *output,
			    uint64_t tokens, int32_t *ids, float *weights);

#ifdef __cplusplus
}
#endif

#endif
