/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, what a client writes: a client that writes garbage
 * (descriptors that break every rule of proto.h, ring indices far out of
 * range, HELLOs of other versions, sizes or lengths, junk, a HELLO twice)
 * only hurts itself: its good requests still complete with the right bits,
 * moed ends only the sessions whose rings are corrupt, and other clients
 * are served throughout.  The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "e2eutil.h"
#include "proto/proto.h"

static bool is_moe_layer(const struct moe_test_model *m, uint32_t layer)
{
	for (uint32_t i = 0; i < m->nl; i++)
		if (m->layers[i] == layer)
			return true;
	return false;
}

/* Rounds until told to stop; exits 1 at the first wrong bit. */
static int normal_client(void *p)
{
	const struct client_arg *a = p;
	struct session s;

	if (rounds_until_stop(a, &s, 0x6009ull, 3))
		return 1;
	session_close(&s);
	return 0;
}

/* The contract of a descriptor (proto.h, moe_client_submit()): would a
 * daemon that follows it accept @q? */
static bool sqe_acceptable(const struct moe_test_model *m, const struct moe_test_raw *r, const struct moe_sqe *q, uint32_t max_tokens)
{
	uint64_t es, bytes, rbytes;

	if (q->opcode == MOE_OP_NOP)
		return true;
	if (q->opcode != MOE_OP_FORWARD || (q->flags & ~MOE_SQE_ROUTING) || !is_moe_layer(m, q->layer) ||
	    (q->dtype != MOE_F32 && q->dtype != MOE_BF16) || q->tokens == 0 || q->tokens > max_tokens)
		return false;
	es = q->dtype == MOE_F32 ? 4 : 2;
	bytes = q->tokens * m->H * es;
	if (q->in_off % es || q->in_off > r->arena_bytes || bytes > r->arena_bytes - q->in_off)
		return false;
	if (q->out_off % es || q->out_off > r->arena_bytes || bytes > r->arena_bytes - q->out_off)
		return false;
	if (!(q->flags & MOE_SQE_ROUTING))
		return true;
	rbytes = q->tokens * m->k * 4;
	return !(q->ids_off % 4 || q->ids_off > r->arena_bytes || rbytes > r->arena_bytes - q->ids_off ||
		 q->weights_off % 4 || q->weights_off > r->arena_bytes || rbytes > r->arena_bytes - q->weights_off);
}

static void sqe_describe(const struct moe_sqe *q, char *buf, size_t len)
{
	snprintf(buf, len, "{opcode %u, flags 0x%x, layer %u, dtype %u, tokens %" PRIu64 ", in_off %" PRIu64
		 ", out_off %" PRIu64 ", ids_off %" PRIu64 ", weights_off %" PRIu64 "}", q->opcode, q->flags, q->layer,
		 q->dtype, q->tokens, q->in_off, q->out_off, q->ids_off, q->weights_off);
}

static uint64_t pick_u64(uint64_t *rng, const uint64_t *v, size_t n)
{
	return v[rand_below(rng, n)];
}

/* A valid descriptor @good spoiled in 1..3 ways (or, one time in four,
 * random bits), that the contract refuses. */
static void sqe_hostile(uint64_t *rng, const struct moe_test_model *m, const struct moe_test_raw *r, const struct moe_sqe *good,
			uint32_t max_tokens, struct moe_sqe *q)
{
	const uint64_t A = r->arena_bytes;

	do {
		*q = *good;
		if (rand_below(rng, 4) == 0) {
			uint64_t *w = (uint64_t *)q;

			for (size_t i = 0; i < sizeof(*q) / 8; i++)
				w[i] = moe_test_rand(rng);
			if (rand_below(rng, 2)) {    /* plausible header, random sizes and offsets */
				q->opcode = MOE_OP_FORWARD;
				q->flags &= MOE_SQE_ROUTING;
				q->layer = m->layers[rand_below(rng, m->nl)];
				q->dtype &= 1;
			}
		} else {
			for (uint32_t n = 1 + rand_below(rng, 3); n; n--) {
				uint64_t es = q->dtype == MOE_F32 ? 4 : 2;
				uint64_t bytes = q->tokens * m->H * es;

				switch (rand_below(rng, 12)) {
				case 0:
					q->opcode = 2 + rand_below(rng, 1000) + (rand_below(rng, 2) ? UINT32_MAX - 1002 : 0);
					break;
				case 1:
					q->flags |= 2u << rand_below(rng, 31);
					break;
				case 2: {
					const uint64_t v[] = { 0, 4, 99, UINT32_MAX, moe_test_rand(rng) | 0x10000 };

					q->layer = (uint32_t)pick_u64(rng, v, 5);
					break;
				}
				case 3:
					q->dtype = rand_below(rng, 2) ? 2 + rand_below(rng, 10) : UINT32_MAX;
					break;
				case 4:
					q->tokens = 0;
					break;
				case 5: {
					const uint64_t v[] = { (uint64_t)max_tokens + 1, UINT64_MAX, 1ull << 40,
							       (1ull << 32) | 1, (uint64_t)max_tokens + 1 + rand_below(rng, 1 << 20) };

					q->tokens = pick_u64(rng, v, 5);
					break;
				}
				case 6: {   /* input past or across the arena's end, or wrapping around */
					const uint64_t v[] = { A, A + 4 * (1 + rand_below(rng, 4096)), A - 4 * (uint64_t)m->H / 2,
							       UINT64_MAX - 3, (1ull << 63), UINT64_MAX - bytes + 8 };

					q->in_off = pick_u64(rng, v, 6) & ~3ull;
					break;
				}
				case 7: {
					const uint64_t v[] = { A, A + 4096, A - 64, UINT64_MAX & ~3ull, UINT64_MAX - bytes + 8 };

					q->out_off = pick_u64(rng, v, 5) & ~3ull;
					break;
				}
				case 8:   /* misaligned */
					if (rand_below(rng, 2))
						q->in_off += 1 + (es == 4 ? rand_below(rng, 3) : 0);
					else
						q->out_off += 1 + (es == 4 ? rand_below(rng, 3) : 0);
					break;
				case 9: {
					const uint64_t v[] = { A, A - 4, q->ids_off + 1, UINT64_MAX - 3, A + 1000000 };

					q->flags |= MOE_SQE_ROUTING;
					q->ids_off = pick_u64(rng, v, 5);
					break;
				}
				case 10: {
					const uint64_t v[] = { A, A - 8, q->weights_off + 2, UINT64_MAX - 7,
							       (uint64_t)INT64_MAX + 1 };

					q->flags |= MOE_SQE_ROUTING;
					q->weights_off = pick_u64(rng, v, 5);
					break;
				}
				default:  /* as many tokens as allowed, the input one element past the end */
					q->dtype = MOE_F32;
					q->tokens = A / (m->H * 4) < max_tokens ? A / (m->H * 4) : max_tokens;
					q->in_off = A - q->tokens * m->H * 4 + 4;
					break;
				}
			}
		}
	} while (q->opcode == MOE_OP_NOP || sqe_acceptable(m, r, q, max_tokens));
}

START_TEST(a_hostile_client_hurts_only_itself)
{
	enum { BATCHES = 12, PER_BATCH = 40, T = 8 };
	struct board *b = board_new();
	struct client_arg na;
	struct moe_engine *e;
	struct moe_client *c;
	struct moe_test_raw r, r2;
	struct moe_test_model m;
	struct moe_test_moed d;
	struct job j;
	struct moe_sqe good, batch[PER_BATCH + 1];
	struct moe_cqe cqes[PER_BATCH + 1];
	uint64_t rng = 0x4057113ull, rounds0;
	uint32_t max_tokens = 8192, H;
	char why[512], desc[256];
	pid_t normal;
	int silent, fd, rc;

	model_make(&m, "daemon-hostile");
	H = m.H;
	moed_config(&d, &m, NULL, "limits = { segment_mb = 16; };");
	moed_start(&d);
	na = (struct client_arg){ .m = &m, .sock = d.sock, .b = b, .id = 0, .max_tokens = 32 };
	normal = spawn(normal_client, &na);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS; !atomic_load(&b->rounds[0]);) {
		moed_assert(&d, waitpid(normal, NULL, WNOHANG) == 0, "the normal client failed (above)");
		ck_assert_msg(moe_test_now_ms() < end, "the normal client did not start");
		moe_test_sleep_ms(5);
	}
	ck_assert_int_eq(ref_open(&m, &e, why, sizeof(why)), 0);   /* no fork() after this */

	/* ---- (a) descriptors that break every rule, with a good one in each batch */
	struct moe_msg_hello h4 = { .version = MOE_PROTO_VERSION, .arena_bytes = 4u << 20, .sq_entries = 64 };

	rc = moe_test_raw_open(&r, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	max_tokens = r.w.max_tokens;
	ck_assert_uint_ge(r.arena_bytes, 4u << 20);
	memset(&j, 0, sizeof(j));
	j = (struct job){ .layer = m.layers[1], .dtype = MOE_F32, .T = T, .routing = true, .async = true,
			  .bytes = (size_t)T * H * 4 };
	good = (struct moe_sqe){ .opcode = MOE_OP_FORWARD, .flags = MOE_SQE_ROUTING, .layer = j.layer,
				 .dtype = MOE_F32, .tokens = T, .in_off = 0, .out_off = j.bytes,
				 .ids_off = 2 * j.bytes, .weights_off = 2 * j.bytes + T * m.k * 4 };
	j.in = r.arena + good.in_off;
	j.out = r.arena + good.out_off;
	j.ids = (int32_t *)(r.arena + good.ids_off);
	j.w = (float *)(r.arena + good.weights_off);
	for (int bi = 0; bi < BATCHES; bi++) {
		bool seen[PER_BATCH + 1] = { false };
		uint32_t got, good_at = rand_below(&rng, PER_BATCH + 1);

		fill_input(j.in, MOE_F32, (size_t)T * H, &rng);
		memset(j.out, 0xa5, j.bytes);
		memset(j.ids, 0xa5, T * m.k * 4);
		memset(j.w, 0xa5, T * m.k * 4);
		ck_assert_int_eq(ref_forward(e, &m, &j, why, sizeof(why)), 0);
		for (uint32_t i = 0; i <= PER_BATCH; i++) {
			if (i == good_at)
				batch[i] = good;
			else
				sqe_hostile(&rng, &m, &r, &good, max_tokens, &batch[i]);
			batch[i].user_data = 0x1000u * (uint64_t)(bi + 1) + i;
		}
		moe_test_raw_push(&r, batch, PER_BATCH + 1);
		got = moe_test_raw_reap(&r, cqes, PER_BATCH + 1, WAIT_MS);
		moed_assert(&d, got == PER_BATCH + 1, "batch %d: %u of %d completions came (a request was dropped)",
			    bi, got, PER_BATCH + 1);
		for (uint32_t i = 0; i < got; i++) {
			uint64_t x = cqes[i].user_data - 0x1000u * (uint64_t)(bi + 1);

			ck_assert_msg(x <= PER_BATCH && !seen[x], "batch %d: a completion for user_data 0x%" PRIx64
				      " that is not due", bi, cqes[i].user_data);
			seen[x] = true;
			sqe_describe(&batch[x], desc, sizeof(desc));
			if (x == good_at) {
				ck_assert_msg(cqes[i].res == 0, "batch %d: the good descriptor %s among hostile ones "
					      "failed: %s", bi, desc, moe_strerror(cqes[i].res));
			} else {
				ck_assert_msg(cqes[i].res < 0, "batch %d: hostile descriptor %s was accepted (res %d)",
					      bi, desc, cqes[i].res);
			}
		}
		ck_assert_msg(job_check(&m, &j, why, sizeof(why)) == 0, "batch %d: the good descriptor: %s", bi, why);
		job_free(&j);
		ck_assert_msg(__atomic_load_n(&r.hdr->daemon_state, __ATOMIC_ACQUIRE) == MOE_SEG_SERVING &&
			      !peer_closes(r.fd, 0), "batch %d: moed ended the session of bad descriptors", bi);
	}

	/* ---- (b) a submission tail 10000 ahead: moed ends that session, quickly */
	rc = moe_test_raw_open(&r2, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	__atomic_store_n(&r2.hdr->sq_tail, __atomic_load_n(&r2.hdr->sq_head, __ATOMIC_ACQUIRE) + 10000,
			 __ATOMIC_RELEASE);
	moe_test_raw_kick(&r2);
	moed_assert(&d, peer_closes(r2.fd, 1000), "a client with sq_tail = sq_head + 10000 is still connected "
		    "after 1 s");
	ck_assert_uint_eq(__atomic_load_n(&r2.hdr->daemon_state, __ATOMIC_ACQUIRE), MOE_SEG_CLOSED);
	moe_test_raw_close(&r2);

	/* ---- (c) a completion head beyond the tail, then a NOP to make moed look */
	rc = moe_test_raw_open(&r2, d.sock, &h4);
	moed_assert(&d, rc == 0, "a raw session: %s", moe_strerror(rc));
	__atomic_store_n(&r2.hdr->cq_head, __atomic_load_n(&r2.hdr->cq_tail, __ATOMIC_ACQUIRE) + 5000,
			 __ATOMIC_RELEASE);
	{
		struct moe_sqe nop = { .opcode = MOE_OP_NOP, .user_data = 7 };

		moe_test_raw_push(&r2, &nop, 1);
	}
	moed_assert(&d, peer_closes(r2.fd, 1000), "a client with cq_head = cq_tail + 5000 is still connected "
		    "after 1 s");
	moe_test_raw_close(&r2);
	moed_assert(&d, moe_test_moed_log_has(&d, "corrupt"), "moed's log does not say why it dropped the corrupt sessions");

	/* ---- (d) the handshake */
	/* a client that connects and says nothing (moed drops it after its HELLO timeout) */
	silent = moe_test_dial(d.sock);
	ck_assert_int_ge(silent, 0);
	/* random bytes: dropped, no answer */
	fd = moe_test_dial(d.sock);
	ck_assert_int_ge(fd, 0);
	{
		uint8_t junk[80];

		for (size_t i = 0; i < sizeof(junk); i++)
			junk[i] = (uint8_t)moe_test_rand(&rng);
		ck_assert_int_eq(moe_test_send_all(fd, junk, sizeof(junk)), 0);
		moed_assert(&d, peer_closes(fd, 1000), "random bytes as a HELLO: moed kept the connection");
		close(fd);
	}
	/* a HELLO of another protocol version: WELCOME with -MOE_E_PROTO, then closed */
	for (int v = 0; v < 3; v++) {
		const uint32_t versions[] = { 0, MOE_PROTO_VERSION + 1, UINT32_MAX };
		struct moe_msg_hello h = { .version = versions[v] };
		struct moe_msg_welcome w;
		int segfd = -1;

		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		rc = moe_test_hello_exchange(fd, &h, &w, &segfd);
		moed_assert(&d, rc == 0 && w.status == -MOE_E_PROTO && segfd < 0, "HELLO version %u: got %d, status %d "
			    "(%s), fd %d; want a WELCOME with -MOE_E_PROTO and no fd", h.version, rc, rc ? 0 : w.status,
			    rc ? "" : w.message, segfd);
		ck_assert_msg(peer_closes(fd, 1000), "HELLO version %u: still connected after the refusal", h.version);
		close(fd);
	}
	/* sizes the daemon must refuse with a status, not a crash (the
	 * arithmetic edges: hello_sizes_that_overflow_are_refused) */
	{
		const struct moe_msg_hello bad[] = {
			{ .version = MOE_PROTO_VERSION, .sq_entries = 3 },
			{ .version = MOE_PROTO_VERSION, .sq_entries = 1u << 31 },
			{ .version = MOE_PROTO_VERSION, .arena_bytes = 1ull << 40 },
		};

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			struct moe_msg_welcome w;
			int segfd = -1;

			fd = moe_test_dial(d.sock);
			ck_assert_int_ge(fd, 0);
			rc = moe_test_hello_exchange(fd, &bad[i], &w, &segfd);
			moed_assert(&d, rc == 0 && w.status < 0 && segfd < 0, "HELLO sq_entries %u arena_bytes %" PRIu64
				    ": got %d, status %d; want a refusal", bad[i].sq_entries, bad[i].arena_bytes, rc,
				    rc ? 0 : w.status);
			close(fd);
		}
	}
	/* a header that promises more than a HELLO, an unknown type, a truncated HELLO */
	{
		struct moe_msg_header hh[] = {
			{ MOE_MSG_MAGIC, MOE_MSG_HELLO, 1u << 30, 0 },
			{ MOE_MSG_MAGIC, 77, 0, 0 },
			{ MOE_MSG_MAGIC, MOE_MSG_WELCOME, sizeof(struct moe_msg_welcome), 0 },
			{ MOE_MSG_MAGIC, MOE_MSG_HELLO, 4, 0 },
		};

		for (size_t i = 0; i < sizeof(hh) / sizeof(hh[0]); i++) {
			uint8_t pad[8] = { 1, 0, 0, 0 };

			fd = moe_test_dial(d.sock);
			ck_assert_int_ge(fd, 0);
			ck_assert_int_eq(moe_test_send_all(fd, &hh[i], sizeof(hh[i])), 0);
			if (hh[i].len == 4)
				ck_assert_int_eq(moe_test_send_all(fd, pad, 4), 0);
			moed_assert(&d, peer_closes(fd, 1000), "header {type %u, len %u}: moed kept the connection",
				    hh[i].type, hh[i].len);
			close(fd);
		}
		/* truncated: half a HELLO, then close */
		struct {
			struct moe_msg_header h;
			struct moe_msg_hello b;
		} msg = { { MOE_MSG_MAGIC, MOE_MSG_HELLO, sizeof(struct moe_msg_hello), 0 },
			  { .version = MOE_PROTO_VERSION } };

		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(moe_test_send_all(fd, &msg, sizeof(msg.h) + 10), 0);
		close(fd);
		/* a good HELLO, one byte at a time, is a good HELLO */
		fd = moe_test_dial(d.sock);
		ck_assert_int_ge(fd, 0);
		for (size_t i = 0; i < sizeof(msg); i++) {
			ck_assert_int_eq(moe_test_send_all(fd, (uint8_t *)&msg + i, 1), 0);
			if (i % 16 == 0)
				usleep(200);
		}
		{
			struct moe_msg_header rh;
			struct moe_msg_welcome w;
			int segfd = -1;

			rc = moe_test_recv_all(fd, &rh, sizeof(rh), &segfd, 5000);
			if (rc == 0)
				rc = moe_test_recv_all(fd, &w, sizeof(w), &segfd, 5000);
			moed_assert(&d, rc == 0 && rh.type == MOE_MSG_WELCOME && w.status == 0 && segfd >= 0,
				    "a HELLO sent byte by byte: got %d, status %d, fd %d", rc, rc ? 0 : w.status, segfd);
			close(segfd);
			/* a second HELLO on a welcomed session ends it */
			ck_assert_int_eq(moe_test_send_all(fd, &msg, sizeof(msg)), 0);
			moed_assert(&d, peer_closes(fd, 1000), "a second HELLO: moed kept the connection");
			close(fd);
		}
	}

	/* ---- moed is alive, the hostile session still works, the others were served */
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	{
		memset(j.out, 0xa5, j.bytes);
		ck_assert_int_eq(ref_forward(e, &m, &j, why, sizeof(why)), 0);
		good.user_data = 42;
		moe_test_raw_push(&r, &good, 1);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 1, WAIT_MS) == 1 && cqes[0].res == 0,
			    "the hostile session's last good request did not complete");
		ck_assert_msg(job_check(&m, &j, why, sizeof(why)) == 0, "the hostile session's last request: %s", why);
		job_free(&j);
	}
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "a new client after the attacks: %s", moe_strerror(rc));
	rng = 99;
	rc = client_round(c, e, &m, &rng, 3, true, 32, why, sizeof(why));
	ck_assert_msg(rc == 0, "a new client after the attacks: %s", why);
	moe_client_disconnect(c);
	rounds0 = atomic_load(&b->rounds[0]);
	for (uint64_t end = moe_test_now_ms() + CLIENT_TIMEOUT_MS; atomic_load(&b->rounds[0]) < rounds0 + 2;) {
		moed_assert(&d, waitpid(normal, NULL, WNOHANG) == 0, "the normal client failed (above)");
		ck_assert_msg(moe_test_now_ms() < end, "the normal client stalled");
		moe_test_sleep_ms(5);
	}
	atomic_store(&b->stop, 1);
	assert_child_ok(normal, "the normal client");
	close(silent);
	moe_test_raw_close(&r);
	moe_engine_close(e);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	munmap(b, sizeof(*b));
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-rings");
	TCase *tc = tcase_create("daemon-rings");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, a_hostile_client_hurts_only_itself);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-rings");
}
