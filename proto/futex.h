/* SPDX-License-Identifier: MIT */
/*
 * Futex calls on words in a shared (not process-private) mapping, for the
 * wakeup protocol of proto.h.  Internal; both moed and libmoeclient use it.
 */
#ifndef MOE_FUTEX_H
#define MOE_FUTEX_H

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* A spin-wait hint to the CPU. */
static inline void moe_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#else
	__asm__ __volatile__("" ::: "memory");
#endif
}

/* Sleep while *@word == @val, at most @timeout_ns (0: no limit).  0 when
 * woken or the value differed, -ETIMEDOUT, -EINTR. */
static inline int moe_futex_wait(uint32_t *word, uint32_t val, uint64_t timeout_ns)
{
	struct timespec ts = { (time_t)(timeout_ns / 1000000000u), (long)(timeout_ns % 1000000000u) };
	long r = syscall(SYS_futex, word, FUTEX_WAIT, val, timeout_ns ? &ts : NULL, NULL, 0);

	if (r < 0 && errno != EAGAIN)
		return -errno;
	return 0;
}

/* Wake up to @n sleepers on @word. */
static inline void moe_futex_wake(uint32_t *word, int n)
{
	syscall(SYS_futex, word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Bump @word and wake its sleepers, if @waiting says one may sleep; the
 * caller has published its data and issued a full fence before. */
static inline void moe_futex_kick(uint32_t *word, const uint32_t *waiting, int n)
{
	if (__atomic_load_n(waiting, __ATOMIC_RELAXED)) {
		__atomic_fetch_add(word, 1, __ATOMIC_RELEASE);
		moe_futex_wake(word, n);
	}
}

#endif
