/* SPDX-License-Identifier: MIT */
/*
 * moed end to end, device memory on the CPU backend: libmoeclient refuses
 * to register memory with it, moed answers CUDA_MAP and CUDA_UNMAP with a
 * clear refusal, descriptors that name device regions fail alone, and the
 * session keeps working.  The harness is e2eutil.h.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "e2eutil.h"
#include "engine/dtype.h"
#include "proto/proto.h"

/*
 * Device memory on moed's CPU backend: libmoeclient refuses what is not
 * CUDA memory (or has no driver to ask), moed answers a CUDA_MAP with a
 * clear refusal, and descriptors that name device regions it never mapped
 * fail alone; the session keeps working.
 */
START_TEST(device_memory_on_the_cpu_backend_is_refused_cleanly)
{
	struct moe_test_moed d;
	struct moe_test_raw r;
	struct moe_cqe cqes[4];
	struct moe_client *c;
	struct moe_test_model m;
	uint32_t region = 99;
	float host[64];
	int rc;

	model_make(&m, "daemon-device");
	moed_config(&d, &m, NULL, NULL);
	moed_start(&d);

	/* the library: moed's WELCOME says its backend takes no device memory */
	rc = moe_client_connect(d.sock, NULL, &c);
	moed_assert(&d, rc == 0, "connect: %s", moe_strerror(rc));
	rc = moe_client_cuda_register(c, host, sizeof(host), &region);
	ck_assert_msg(rc == -EOPNOTSUPP, "registering memory with a CPU moed gave %d (%s)", rc, moe_strerror(rc));
	ck_assert_uint_eq(region, 99);
	ck_assert_int_eq(moe_client_forward_cuda(c, m.layers[0], host, host, 1, NULL, NULL), -EFAULT);
	ck_assert_int_eq(moe_client_cuda_unregister(c, 0), -EINVAL);
	ck_assert_int_eq(moe_client_cuda_unregister(c, 1000), -EINVAL);
	moe_client_disconnect(c);

	/* the protocol: a CUDA_MAP with a made-up handle */
	rc = moe_test_raw_open(&r, d.sock, NULL);
	moed_assert(&d, rc == 0, "raw session: %d", rc);
	{
		struct {
			struct moe_msg_header h;
			struct moe_msg_cuda_map m;
		} msg = { { .magic = MOE_MSG_MAGIC, .type = MOE_MSG_CUDA_MAP, .len = sizeof(struct moe_msg_cuda_map) },
			  { .offset = 0, .bytes = 4096 } };
		struct moe_msg_header rh;
		struct moe_msg_cuda_reply rep;

		memset(msg.m.handle, 0x5a, sizeof(msg.m.handle));
		ck_assert_int_eq(moe_test_send_all(r.fd, &msg, sizeof(msg)), 0);
		rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
		if (rc == 0)
			rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
		moed_assert(&d, rc == 0 && rh.type == MOE_MSG_CUDA_MAP && rh.len == sizeof(rep),
			    "no CUDA_MAP answer: %d", rc);
		ck_assert_int_eq(rep.status, -EOPNOTSUPP);
		ck_assert_msg(strstr(rep.message, "CUDA backend") != NULL, "the refusal says: %s", rep.message);
		moed_assert(&d, moe_test_moed_log_has(&d, "device memory refused"), "moed did not log the refusal");
		/* a region that is not in its allocation, and an unmap of nothing */
		msg.m.offset = UINT64_MAX - 10;
		ck_assert_int_eq(moe_test_send_all(r.fd, &msg, sizeof(msg)), 0);
		rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
		if (rc == 0)
			rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
		moed_assert(&d, rc == 0 && rep.status == -EINVAL, "an impossible region: %d, status %d", rc,
			    rep.status);
		{
			struct {
				struct moe_msg_header h;
				struct moe_msg_cuda_unmap m;
			} um = { { .magic = MOE_MSG_MAGIC, .type = MOE_MSG_CUDA_UNMAP,
				   .len = sizeof(struct moe_msg_cuda_unmap) }, { .region = 3 } };

			ck_assert_int_eq(moe_test_send_all(r.fd, &um, sizeof(um)), 0);
			rc = moe_test_recv_all(r.fd, &rh, sizeof(rh), NULL, 5000);
			if (rc == 0)
				rc = moe_test_recv_all(r.fd, &rep, sizeof(rep), NULL, 5000);
			moed_assert(&d, rc == 0 && rh.type == MOE_MSG_CUDA_UNMAP && rep.status == -EINVAL,
				    "unmapping region 3 that was never mapped: %d, status %d", rc, rep.status);
		}
	}
	/* descriptors naming regions that do not exist, or region bits without
	 * the device flag, or bf16 on a device region */
	{
		uint64_t bytes = (uint64_t)m.H * 4;
		struct moe_sqe q[4] = {
			{ .user_data = 1, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_F32, .tokens = 1,
			  .flags = MOE_SQE_DEVICE | MOE_SQE_REGIONS(0, 0) },
			{ .user_data = 2, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_F32, .tokens = 1,
			  .flags = MOE_SQE_DEVICE | MOE_SQE_REGIONS(200, 3) },
			{ .user_data = 3, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_F32, .tokens = 1,
			  .flags = MOE_SQE_REGIONS(1, 1), .out_off = bytes },
			{ .user_data = 4, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_BF16, .tokens = 1,
			  .flags = MOE_SQE_DEVICE },
		};
		int want[4] = { -EFAULT, -EFAULT, -EINVAL, -EINVAL };

		moe_test_raw_push(&r, q, 4);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 4, WAIT_MS) == 4, "the bad descriptors did not complete");
		for (int i = 0; i < 4; i++)
			ck_assert_msg(cqes[i].user_data == (uint64_t)i + 1 && cqes[i].res == want[i],
				      "descriptor %d completed with %d, not %d", i + 1, cqes[i].res, want[i]);
	}
	/* and a good request still works on that session */
	{
		struct moe_sqe ok = { .user_data = 5, .opcode = MOE_OP_FORWARD, .layer = m.layers[0], .dtype = MOE_F32,
				      .tokens = 1, .in_off = 0, .out_off = (uint64_t)m.H * 4 };

		memset(r.arena, 0, (size_t)m.H * 4);
		moe_test_raw_push(&r, &ok, 1);
		moed_assert(&d, moe_test_raw_reap(&r, cqes, 1, WAIT_MS) == 1 && cqes[0].res == 0,
			    "a good request after them failed: %d", cqes[0].res);
	}
	moe_test_raw_close(&r);
	moed_assert(&d, moe_test_moed_alive(&d), "moed died");
	moed_stop(&d);
	moe_test_model_free(&m);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("daemon-device");
	TCase *tc = tcase_create("daemon-device");

	tcase_set_timeout(tc, 240);
	tcase_add_test(tc, device_memory_on_the_cpu_backend_is_refused_cleanly);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return moe_test_run_suite(suite(), "daemon-device");
}
