#!/bin/sh
# SPDX-License-Identifier: MIT
# Run the libFuzzer harnesses of fuzz/ (built by make check when configure
# found a clang with the fuzzer runtime).
#
#   make check: each target over its seed corpus (fuzz/corpus/TARGET), then
#               FUZZ_SECONDS (default 3) of fuzzing from a fixed seed; new
#               inputs go to a scratch directory.  Exit 77 (skip), saying
#               why, without the harnesses.
#   make fuzz:  FUZZ_SECONDS=600 each, a random seed, new inputs kept in
#               FUZZ_OUT/TARGET (fuzz/found/ in the build directory).
#
# Arguments: the targets to run (default: all).  A crash, a leak, a timeout
# or a failed check of a harness fails the run; the input that did it is
# kept as fuzz/artifacts/TARGET-* in the build directory, and the end of
# libFuzzer's report is printed.  Reproduce: fuzz/fuzz_TARGET FILE.
set -u
# absolute: each target runs in a scratch directory
src=$(cd "${top_srcdir:-.}" && pwd) || exit 1
bld=$(cd "${top_builddir:-.}" && pwd) || exit 1
targets=${*:-store safetensors hfconfig npy trace conf checkpoint proto}

if [ -n "${FUZZ_MISSING:-}" ]; then
	echo "SKIP: fuzz harnesses not built: $FUZZ_MISSING"
	exit 77
fi
for t in $targets; do
	if [ ! -x "$bld/fuzz/fuzz_$t" ]; then
		echo "FAIL: $bld/fuzz/fuzz_$t is missing (make check builds it; targets:" \
			"store safetensors hfconfig npy trace conf checkpoint proto)" >&2
		exit 1
	fi
done

secs=${FUZZ_SECONDS:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/moe-fuzz.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
art=$bld/fuzz/artifacts
mkdir -p "$art" || exit 1
art=$(cd "$art" && pwd)
if [ -n "${FUZZ_OUT:-}" ]; then
	seed=0          # libFuzzer picks one
else
	seed=${FUZZ_SEED:-1}
fi
# libconfig's own leak (see the file); halt_on_error: one report per input
LSAN_OPTIONS="suppressions=$src/fuzz/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export LSAN_OPTIONS UBSAN_OPTIONS

# fuzz_proto drives a real moed: a small store for it
proto_env() {
	if [ ! -f "$work/proto.moe" ]; then
		"${MOECTL:-$bld/client/moectl}" gen-model --arch qwen3_moe --layers 2 --hidden 64 \
			--moe-intermediate 32 --experts 8 --top-k 2 --vocab 32 -o "$work/proto-ckpt" >/dev/null &&
		"${MOECTL:-$bld/client/moectl}" pack "$work/proto-ckpt" -o "$work/proto.moe" >/dev/null || return 1
	fi
	MOE_FUZZ_STORE=$work/proto.moe
	MOED=${MOED:-$bld/daemon/moed}
	export MOE_FUZZ_STORE MOED
}

bad=0
for t in $targets; do
	new=${FUZZ_OUT:+$FUZZ_OUT/$t}
	new=${new:-$work/new-$t}
	mkdir -p "$new" "$work/run-$t" || exit 1
	extra=
	if [ "$t" = proto ]; then
		proto_env || { echo "FAIL: fuzz_proto: cannot make its store" >&2; bad=1; continue; }
		extra=-max_len=4097
	fi
	# in a scratch directory (conf's @include resolves there), stdin closed
	(cd "$work/run-$t" && exec "$bld/fuzz/fuzz_$t" -max_total_time="$secs" -seed="$seed" \
		-timeout=30 -rss_limit_mb=2048 -print_final_stats=1 $extra \
		-artifact_prefix="$art/$t-" "$new" "$src/fuzz/corpus/$t") \
		</dev/null >"$work/$t.log" 2>&1
	rc=$?
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
	if [ $rc -ne 0 ]; then
		echo "FAIL: fuzz_$t (exit $rc); the input is in $art/, libFuzzer said:" >&2
		grep -v '^#[0-9]\|^stat::' "$work/$t.log" | tail -40 >&2
		bad=1
	else
		where="$new"
		[ -n "${FUZZ_OUT:-}" ] || where="the scratch corpus"
		echo "ok: fuzz_$t: ${runs:-?} inputs in ${secs} s, $(ls "$new" | wc -l) new in $where"
	fi
done
exit $bad
