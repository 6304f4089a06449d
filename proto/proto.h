/* SPDX-License-Identifier: MIT */
/*
 * The wire protocol between moed and libmoeclient: the control messages on
 * the unix socket and the layout of a client's shared-memory segment.
 * Internal to the project (not installed); both sides include it, so the
 * two can never disagree on a layout.  Everything is little-endian,
 * fixed-width and naturally aligned; a version in the HELLO and in the
 * segment header lets either side refuse what it does not know.
 *
 * Control (unix stream socket, one connection per session):
 *   client -> daemon  MOE_MSG_HELLO   struct moe_msg_hello
 *   daemon -> client  MOE_MSG_WELCOME struct moe_msg_welcome, with the
 *                     segment's memfd as SCM_RIGHTS (or status < 0, no fd)
 *   client -> daemon  MOE_MSG_STATS   no payload
 *   daemon -> client  MOE_MSG_STATS   JSON text (not NUL-terminated)
 *   client -> daemon  MOE_MSG_CUDA_MAP    struct moe_msg_cuda_map: a CUDA IPC
 *                     handle of the client's device memory
 *   daemon -> client  MOE_MSG_CUDA_MAP    struct moe_msg_cuda_reply (the
 *                     region's number, or why not)
 *   client -> daemon  MOE_MSG_CUDA_UNMAP  struct moe_msg_cuda_unmap
 *   daemon -> client  MOE_MSG_CUDA_UNMAP  struct moe_msg_cuda_reply
 * Every message starts with struct moe_msg_header; len counts the payload.
 * Closing the socket ends the session; tensors never cross it.
 *
 * Segment (a sealed memfd the daemon creates, mapped by both):
 *   [0, 4096)              struct moe_seg_header (ring indices, wakeup words)
 *   [sq_off, +sq_entries)  struct moe_sqe ring, written by the client
 *   [cq_off, +cq_entries)  struct moe_cqe ring, written by the daemon
 *   [arena_off, +arena)    the arena: the client's tensors; descriptors
 *                          carry offsets into it, never pointers
 *
 * Rings (as io_uring's): single producer, single consumer, free-running
 * uint32 indices (entry = ring[index & (entries - 1)]); the producer writes
 * the entry, then stores tail with release; the consumer loads tail with
 * acquire, reads the entries, then stores head with release.  The daemon
 * never trusts what the client wrote: it keeps its own copy of the SQ head
 * and CQ tail, reads the SQ tail once per pass and refuses it if it is more
 * than sq_entries ahead, copies each descriptor before checking it.
 *
 * Wakeups (io_uring's SQPOLL protocol, with futexes): a sleeper sets its
 * need-wakeup flag, issues a full fence, checks for work once more, then
 * FUTEX_WAITs on its futex word with the value read before the flag; a
 * producer publishes, issues a full fence, and if the flag is set
 * increments the futex word and FUTEX_WAKEs it.  So an idle side costs
 * nothing and a busy one no system call per request.
 *
 * A full completion ring: the daemon takes a submission only when its
 * completion has room, so a client that stops reading its completions
 * (stopped, in a debugger) has submissions the daemon cannot take.  The
 * daemon does not count them as work (it would spin on them); it sleeps
 * with MOE_DAEMON_WAIT_CQ set in daemon_wait as well, and a client that
 * advances cq_head issues a full fence and, if that bit is set, kicks
 * daemon_futex as after a submission.  A client that does not kick is
 * still served, within the daemon's sleep slice (a second).
 */
#ifndef MOE_PROTO_H
#define MOE_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "libmoeclient/moeclient.h"

#define MOE_PROTO_VERSION 1
#define MOE_MSG_MAGIC 0x4d4f4521u          /* "!EOM" on the wire: "MOE!" read as LE */
#define MOE_SEG_MAGIC 0x5345474du          /* "MGES": "MSEG" */
#define MOE_SEG_HEADER_SIZE 4096u
#define MOE_MSG_MAX (1u << 20)             /* largest control payload (stats JSON) */

enum moe_msg_type {
	MOE_MSG_HELLO = 1,
	MOE_MSG_WELCOME = 2,
	MOE_MSG_STATS = 3,
	MOE_MSG_CUDA_MAP = 4,
	MOE_MSG_CUDA_UNMAP = 5,
};

#define MOE_FEAT_CUDA_MAP (1u << 0)       /* the daemon knows MOE_MSG_CUDA_MAP/UNMAP */
#define MOE_FEAT_DEVICE_MEMORY (1u << 1)  /* ... and its backend maps device memory */
#define MOE_FEAT_FINGERPRINT (1u << 2)    /* WELCOME's fingerprint is filled (all zero: the
					   * store records none) */

#define MOE_MAX_REGIONS 16          /* device-memory regions per session (MOE_CUDA_MAX_REGIONS) */

/* Device memory of the client for requests that never leave the GPU: the
 * allocation's cudaIpcMemHandle_t, and the part of it to use. */
struct moe_msg_cuda_map {
	uint8_t handle[64];             /* cudaIpcGetMemHandle of the allocation */
	uint64_t offset;                /* of the region in the allocation */
	uint64_t bytes;                 /* of the region */
	uint32_t device;                /* the client's device ordinal (information) */
	uint32_t reserved[3];
};

struct moe_msg_cuda_unmap {
	uint32_t region;
	uint32_t reserved[3];
};

struct moe_msg_cuda_reply {
	int32_t status;                 /* 0, or a negative errno */
	uint32_t region;                /* with MOE_MSG_CUDA_MAP: its number */
	char message[256];              /* why, when status < 0 */
};

struct moe_msg_header {
	uint32_t magic;                 /* MOE_MSG_MAGIC */
	uint32_t type;                  /* enum moe_msg_type */
	uint32_t len;                   /* payload bytes that follow */
	uint32_t reserved;
};

struct moe_msg_hello {
	uint32_t version;               /* MOE_PROTO_VERSION */
	uint32_t flags;                 /* none yet: 0 */
	uint64_t arena_bytes;           /* wanted; 0: the daemon's default */
	uint32_t sq_entries;            /* wanted, power of two; 0: default */
	uint32_t reserved[9];
};

#define MOE_INFO_MAX_LAYERS 256     /* MoE layers listed in the WELCOME */

struct moe_msg_welcome {
	int32_t status;                 /* 0, or a negative errno / -MOE_E_* (no fd then) */
	uint32_t version;               /* the daemon's MOE_PROTO_VERSION */
	uint64_t segment_bytes;         /* size of the memfd */
	uint32_t client_id;             /* the daemon's number for this session */
	uint32_t features;              /* MOE_FEAT_*: 0 from daemons before them */
	/* the model */
	char model_type[32];            /* NUL-terminated */
	char backend[16];               /* "cpu", "cuda" */
	uint32_t hidden_size;
	uint32_t moe_intermediate_size;
	uint32_t num_experts;
	uint32_t top_k;
	uint32_t num_hidden_layers;
	uint32_t num_moe_layers;        /* entries of moe_layers used (at most MOE_INFO_MAX_LAYERS) */
	uint32_t weight_dtype;          /* the store's enum moe_dtype (0 f32, 1 bf16, 2 f16, 3 fp8,
					 * 5 int4) */
	uint32_t n_shared_experts;
	uint32_t max_tokens;            /* per request */
	uint8_t fingerprint[16];        /* the store's source_fingerprint (moe-store(5));
					 * with MOE_FEAT_FINGERPRINT, zero otherwise */
	uint32_t reserved1[3];
	uint32_t moe_layers[MOE_INFO_MAX_LAYERS];
	char message[256];              /* why, when status < 0 */
};
/* the fingerprint took four of reserved1's seven words: nothing else moved */
_Static_assert(offsetof(struct moe_msg_welcome, fingerprint) == 108 &&
	       offsetof(struct moe_msg_welcome, moe_layers) == 136, "WELCOME layout as before fingerprints");

/* Activation dtypes of a request: the public enum moe_dtype_act of
 * <moeclient.h> (MOE_F32, MOE_BF16), which this protocol carries as it is. */

enum moe_opcode {
	MOE_OP_NOP = 0,                 /* completes at once with res 0 (ring round trips) */
	MOE_OP_FORWARD = 1,             /* one MoE layer on tokens x hidden */
};

#define MOE_SQE_ROUTING (1u << 0)   /* write ids (int32 [T][k]) and weights (float [T][k]) */
/* in_off and out_off are offsets into device-memory regions (float32 only):
 * the input's region number in bits 16-23 of flags, the output's in 24-31 */
#define MOE_SQE_DEVICE (1u << 1)
#define MOE_SQE_IN_REGION(f) (((f) >> 16) & 0xffu)
#define MOE_SQE_OUT_REGION(f) (((f) >> 24) & 0xffu)
#define MOE_SQE_REGIONS(in, out) (((uint32_t)(in) << 16) | ((uint32_t)(out) << 24))

/* A submission: 64 bytes.  Offsets are into the arena. */
struct moe_sqe {
	uint64_t user_data;             /* echoed in the completion */
	uint32_t opcode;                /* enum moe_opcode */
	uint32_t flags;                 /* MOE_SQE_* */
	uint32_t layer;                 /* the checkpoint's layer number */
	uint32_t dtype;                 /* enum moe_dtype_act of in and out */
	uint64_t tokens;
	uint64_t in_off;                /* tokens x hidden activations */
	uint64_t out_off;               /* the same size */
	uint64_t ids_off;               /* with MOE_SQE_ROUTING */
	uint64_t weights_off;           /* with MOE_SQE_ROUTING */
};
_Static_assert(sizeof(struct moe_sqe) == 64, "an SQE is 64 bytes");

/* A completion: 16 bytes. */
struct moe_cqe {
	uint64_t user_data;
	int32_t res;                    /* 0, or a negative errno / -MOE_E_* */
	uint32_t flags;                 /* none yet */
};
_Static_assert(sizeof(struct moe_cqe) == 16, "a CQE is 16 bytes");

/* The segment header.  Each index and wakeup word has its own cache line:
 * the two sides write different ones. */
struct moe_seg_header {
	uint32_t magic;                 /* MOE_SEG_MAGIC */
	uint32_t version;               /* MOE_PROTO_VERSION */
	uint64_t segment_bytes;
	uint32_t sq_entries;            /* power of two */
	uint32_t cq_entries;            /* power of two, >= sq_entries */
	uint64_t sq_off, cq_off;
	uint64_t arena_off, arena_bytes;
	uint8_t pad0[64 - 48];

	_Alignas(64) uint32_t sq_tail;  /* client: next SQE to fill */
	_Alignas(64) uint32_t sq_head;  /* daemon: SQEs it has taken (information) */
	_Alignas(64) uint32_t cq_tail;  /* daemon: next CQE it fills */
	_Alignas(64) uint32_t cq_head;  /* client: CQEs it has consumed */

	/* the daemon sleeps on daemon_futex when daemon_wait is set
	 * (MOE_DAEMON_WAIT_*) */
	_Alignas(64) uint32_t daemon_futex;
	uint32_t daemon_wait;
	/* the client sleeps on client_futex when client_wait is set */
	_Alignas(64) uint32_t client_futex;
	uint32_t client_wait;
	_Alignas(64) uint32_t daemon_state; /* MOE_SEG_* set by the daemon */
};
_Static_assert(sizeof(struct moe_seg_header) <= MOE_SEG_HEADER_SIZE, "segment header fits its page");

/* daemon_wait: why the daemon may sleep */
#define MOE_DAEMON_WAIT_SQ 1u       /* for submissions: kick after one */
#define MOE_DAEMON_WAIT_CQ 2u       /* ... and for room in the completion ring:
				     * kick after advancing cq_head */

#define MOE_SEG_SERVING 0
#define MOE_SEG_CLOSED 1            /* the daemon stopped serving this segment */

#endif
