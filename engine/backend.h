/* SPDX-License-Identifier: MIT */
/*
 * The compute backend interface: one ops table that the CPU backend
 * (backend_cpu.c, always built, the reference) and the CUDA backend (gpu/,
 * loaded at run time) fill.  A NULL entry means "not supported"; callers
 * check.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"

/* What a backend with a device tier counts for one layer (the engine keeps
 * one per layer and reports it). */
struct moe_device_counters {
	uint64_t hits;                /* expert uses found in device memory */
	uint64_t misses;              /* expert uses copied from the host tier */
	uint64_t bytes;               /* bytes copied host to device */
	uint64_t copy_ns;             /* time of those copies (wall clock) */
};

/* One MoE layer's weights as a backend sees them.  Pointers are host memory
 * owned by the engine; experts[j] is NULL when expert j is not resident.
 * Expert and shared blobs are in the backend's resident layout (see
 * blob_prepare below). */
struct moe_layer_weights {
	const struct moe_model_config *cfg;
	uint32_t layer;               /* the checkpoint's layer number */
	const float *router;          /* [E][H] float32 */
	const float *bias;            /* [E] or NULL (deepseek_v3/glm4_moe correction
				       * bias, gpt_oss router bias) */
	const float *shared_gate;     /* [H] or NULL (qwen2_moe) */
	const void *shared;           /* shared expert blob or NULL */
	const void *const *experts;   /* [E] expert blobs (store layout) */
	struct moe_device_counters *dev;  /* counters to add to, or NULL */
};

/*
 * The flags argument of route(), experts() and experts_begin(): what the
 * caller knows of that call's x and out.  They hold for the one call (for
 * experts_begin, for the split call it starts); 0 is host memory and
 * nothing known.
 */
/* x and out are device pointers (float32, any alignment) into memory that
 * ipc_open mapped; only for a backend that has ipc_open */
#define MOE_BACKEND_DEVICE_IO (1u << 0)
/* experts() and experts_begin() only: x (with the same n) is the x of this
 * backend's last route() call, unchanged since; the backend may use the
 * copy of it that the routing made */
#define MOE_BACKEND_X_ROUTED  (1u << 1)

struct moe_backend_options {
	uint32_t threads;             /* CPU worker threads; 0: one per online CPU */
	uint64_t device_bytes;        /* device tier for experts (cuda); 0: all
				       * free device memory minus a reserve */
	moe_log_fn log;               /* what the backend has to say beyond its
				       * return values (cuda: a failed CUDA or
				       * cuBLAS call, level 3); NULL: silent */
	void *log_ctx;
	const struct moe_model_config *model;  /* the model it will serve, so that
				       * supports and init can refuse one it
				       * cannot compute (-ENOTSUP and why);
				       * NULL: any (the self-test) */
};

struct moe_backend;

struct moe_backend_ops {
	const char *name;

	/* Set up be->priv.  Required.  -ENODEV with a reason in @err when the
	 * backend cannot run here (no device, no driver).  A module whose
	 * compute entries are NULL is called with be == NULL only to say why. */
	int (*init)(struct moe_backend *be, const struct moe_backend_options *opt,
		    struct moe_err *err);
	/* Free be->priv.  Required. */
	void (*fini)(struct moe_backend *be);

	/* Optional: 0 when this backend computes @cfg's layers right, else
	 * -ENOTSUP with the reason in @err (a weight dtype it has no kernels
	 * for).  Called with moe_backend_options.model before init, so that
	 * "auto" takes the CPU instead and "cuda" refuses, both saying why,
	 * before a device is touched.  NULL: it serves every model. */
	int (*supports)(const struct moe_model_config *cfg, struct moe_err *err);

	/*
	 * Router for @n tokens x[n][H] (float32): logits in float32, then the
	 * selection rule of cfg (ARCHITECTURE.md 4.1).  Writes ids[n][k]
	 * (expert indices, in selection order: best first, ties to the lower
	 * index) and w[n][k] (final combine weights), in host memory.  @flags:
	 * MOE_BACKEND_DEVICE_IO or 0; a call with it returns, failed or not,
	 * with no copy from x in flight.  Required.
	 */
	int (*route)(struct moe_backend *be, const struct moe_layer_weights *lw,
		     const float *x, size_t n, int32_t *ids, float *w, unsigned flags);

	/*
	 * out[n][H] = sum_s w[t][s] * expert_{ids[t][s]}(x[t]) + shared(x[t]),
	 * summed in slot order s = 0..kk-1, then the shared part.  @kk is the
	 * number of slots per token (cfg->top_k normally; more for the dense
	 * comparison).  Every expert named in @ids must be resident.  Output
	 * bits of a token do not depend on the other tokens.  @flags:
	 * MOE_BACKEND_DEVICE_IO, MOE_BACKEND_X_ROUTED; a call with
	 * MOE_BACKEND_DEVICE_IO returns, failed or not, with no copy from x or
	 * to out in flight.  Required.
	 */
	int (*experts)(struct moe_backend *be, const struct moe_layer_weights *lw,
		       const float *x, size_t n, uint32_t kk, const int32_t *ids,
		       const float *w, float *out, unsigned flags);

	/*
	 * Optional: the backend's resident layout of an expert blob.
	 * blob_bytes gives the size of an expert of dtype @dt and
	 * intermediate size @inter (a routed expert's: weight_dtype and
	 * moe_intermediate_size, or the shared expert's: shared_dtype and
	 * shared_intermediate_size) in that layout;
	 * blob_prepare converts a blob read from the store into it.  Both NULL:
	 * experts are used in the store's layout.  The weights in
	 * moe_layer_weights are always in the resident layout.
	 */
	uint64_t (*blob_bytes)(const struct moe_model_config *cfg, enum moe_dtype dt, uint32_t inter);
	void (*blob_prepare)(const struct moe_model_config *cfg, enum moe_dtype dt, uint32_t inter,
			     const void *src, void *dst);
	/*
	 * Optional, with blob_prepare: convert the bytes [off, off + len) of a
	 * blob in the store's layout (@src points at byte off; off and len are
	 * multiples of the element size: a byte for FP8, whose float32 scales
	 * may then arrive split) into their places in @dst, the whole
	 * blob in the resident layout.  The pager hands chunks over as they
	 * arrive; any split gives the bytes blob_prepare gives.
	 */
	void (*blob_prepare_range)(const struct moe_model_config *cfg, enum moe_dtype dt,
				   uint32_t inter, const void *src, uint64_t off, uint64_t len,
				   void *dst);

	/*
	 * Optional split form of experts(), so that the experts already
	 * resident compute while the others load: experts_begin takes the
	 * call's arguments (no expert weights are read); experts_run computes
	 * the rows of the experts e with ready[e] != 0 (and the shared expert
	 * when @shared), with @lw's pointers for those experts valid for the
	 * duration of the call; it is called as often as needed, each expert
	 * and the shared one in exactly one call; experts_end writes the
	 * output (and must follow a successful begin, even after a failure,
	 * with @abandon true to only free).  The output bits are those of
	 * experts().  One split call at a time per backend.  @flags as for
	 * experts(), for the whole split call: x stays valid and unchanged
	 * until experts_end; with MOE_BACKEND_DEVICE_IO, a failed begin and
	 * every end return with no copy from x or to out in flight.
	 */
	int (*experts_begin)(struct moe_backend *be, const struct moe_layer_weights *lw,
			     const float *x, size_t n, uint32_t kk, const int32_t *ids,
			     const float *w, float *out, unsigned flags);
	int (*experts_run)(struct moe_backend *be, const struct moe_layer_weights *lw,
			   const uint8_t *ready, bool shared);
	int (*experts_end)(struct moe_backend *be, bool abandon);

	/*
	 * Optional: page-lock [p, p + len) of host memory the engine keeps
	 * expert weights in, so that copies to the device run at full speed
	 * (cudaHostRegister).  A failure is not fatal: copies then go from
	 * pageable memory.  host_unregister undoes it before the memory goes.
	 */
	int (*host_register)(struct moe_backend *be, void *p, size_t len);
	void (*host_unregister)(struct moe_backend *be, void *p);

	/*
	 * Optional, together: another process's device memory.  ipc_open maps
	 * the allocation of a 64-byte cudaIpcMemHandle_t and sets *base and
	 * *bytes, its size as the device knows it (may be called from any
	 * thread); ipc_close unmaps it.  A backend that has them takes
	 * MOE_BACKEND_DEVICE_IO in route(), experts() and experts_begin().
	 */
	int (*ipc_open)(struct moe_backend *be, const void *handle, void **base, uint64_t *bytes);
	void (*ipc_close)(struct moe_backend *be, void *base);
};

/*
 * The ABI between the engine and a backend module (gpu/: a .so opened at
 * run time, built separately and perhaps installed at another time):
 * struct moe_backend_ops, every structure passed through it
 * (moe_backend, moe_backend_options, moe_layer_weights,
 * moe_device_counters, moe_model_config and its enums, moe_err), the ops'
 * arguments, flags and contracts.  Bump it with any change to them, even
 * one that keeps every size: a module built with another version is
 * refused when it is opened (moe_backend_open), never called.
 *   1  the first versioned ABI: route/experts/experts_begin take flags;
 *      moe_backend_options has log and log_ctx
 *   2  enum moe_arch has MOE_ARCH_GLM4_MOE: a version-1 module would route
 *      it by another architecture's rule
 *   3  moe_model_config has shared_dtype; enum moe_dtype has
 *      MOE_DTYPE_FP8_E4M3_B128; blob_* take the dtype; the ops have
 *      supports, moe_backend_options has model
 *   4  MOE_ARCH_GPT_OSS, MOE_ACT_SWIGLU_OAI, moe_model_config's
 *      has_expert_bias, swiglu_alpha and swiglu_limit (expert blobs may
 *      end in biases): a version-3 module would serve gpt_oss without its
 *      biases and clamp
 *   5  MOE_DTYPE_INT4 and moe_model_config's q4_group and q4_flags (the
 *      struct grew; a version-4 module would misread every field after)
 */
#define MOE_BACKEND_ABI_VERSION 5u

/*
 * What a backend module exports, as the symbol named
 * MOE_BACKEND_MODULE_SYMBOL.  abi_version and ops_size stay first, with
 * these types, in every version: the engine reads them before it trusts
 * anything else in the module.
 */
struct moe_backend_module {
	uint32_t abi_version;                 /* MOE_BACKEND_ABI_VERSION it was built with */
	uint32_t ops_size;                    /* sizeof(struct moe_backend_ops) it was built with */
	const struct moe_backend_ops *ops;
};

#define MOE_BACKEND_MODULE_SYMBOL "moe_backend_module"

struct moe_backend {
	const struct moe_backend_ops *ops;
	void *priv;
	void *handle;       /* dlopen handle of a module backend, or NULL */
	char reason[MOE_ERR_MSG_MAX]; /* why "auto" fell back to the CPU, empty
				       * otherwise: an error message (a module's
				       * path and two ABI versions fit) */
};

extern const struct moe_backend_ops moe_backend_cpu_ops;

/*
 * Open backend @name: "cpu", "cuda" or "auto" (CUDA when a device is usable,
 * else the CPU; be->reason then says why).  "cuda" without a usable device
 * fails with -ENODEV and the reason; so does a CUDA module of another ABI
 * (MOE_BACKEND_ABI_VERSION, ops size) or of none, the reason naming the
 * module's path and both versions.
 */
int moe_backend_open(const char *name, const struct moe_backend_options *opt,
		     struct moe_backend **ret, struct moe_err *err);

/* Close a backend; NULL is fine. */
void moe_backend_close(struct moe_backend *be);

/*
 * The self-test: small layers run through @be and through the CPU backend
 * (3 and 200 tokens, one expert taking every token): 0 when every token's
 * experts agree and its output is within a relative L2 of 1e-3; -EIO with
 * the first difference in @err otherwise.  With @model, only the layers of
 * the kinds @model needs (a bf16 layer always; FP8 layers if @model reads
 * FP8; gpt_oss layers if it is gpt_oss), so that a device kernel that fails
 * for one format does not take the device from models that do not use it;
 * with NULL, every layer.  moe_backend_open() runs it on the CUDA backend
 * before it serves, once per kind per process.
 */
int moe_backend_selftest_model(struct moe_backend *be, const struct moe_model_config *model,
			       struct moe_err *err);

/* moe_backend_selftest_model(@be, NULL, @err): every kind of layer. */
int moe_backend_selftest(struct moe_backend *be, struct moe_err *err);

#endif
