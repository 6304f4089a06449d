#!/bin/sh
# SPDX-License-Identifier: MIT
#
# tests/check_gpu, in its quick form (MOE_GPU_TEST_QUICK=1), under NVIDIA's
# compute-sanitizer; skipped (exit 77) without compute-sanitizer
# ($COMPUTE_SANITIZER, PATH, the CUDA directory configure found,
# /usr/local/cuda/bin), without tests/check_gpu, or unless `moectl forward
# --backend cuda` runs (a usable device).  Each tool runs with
# --error-exitcode 1, so that any error it reports fails the test, as does a
# check of check_gpu that fails:
#  - memcheck: out-of-bounds and misaligned device accesses, failed CUDA
#    calls, and device memory still allocated at exit (--leak-check full:
#    every engine check_gpu opens is closed again);
#  - racecheck: data races on shared memory;
#  - synccheck: barriers where not every thread of the block arrives.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

BE=${MOE_GPU_TEST_BACKEND:-cuda}
: "${CHECK_GPU:=${top_builddir:-.}/tests/check_gpu}"
[ -x "$CHECK_GPU" ] || skip "$CHECK_GPU not built"

CS=${COMPUTE_SANITIZER:-}
if [ -z "$CS" ]; then
	cuda_dir=$(sed -n 's/^CUDA_DIR = //p' "${top_builddir:-.}/Makefile" 2>/dev/null)
	for c in "$(command -v compute-sanitizer 2>/dev/null)" "${cuda_dir:+$cuda_dir/bin/compute-sanitizer}" \
		/usr/local/cuda/bin/compute-sanitizer; do
		if [ -n "$c" ] && [ -x "$c" ]; then
			CS=$c
			break
		fi
	done
fi
if [ -z "$CS" ] || [ ! -x "$CS" ]; then
	skip "no compute-sanitizer (PATH, the CUDA directory, \$COMPUTE_SANITIZER)"
fi

gen_model "$T/hf" --arch mixtral --layers 1 --hidden 64 --moe-intermediate 32 --experts 4 --top-k 2 --vocab 64
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
run "$MOECTL" forward --model "$T/m.moe" --backend "$BE" --layer 0 --random-input 1 --output "$T/probe.npy"
[ "$rc" -eq 0 ] || skip "moectl forward --backend $BE does not run here: $(head -n 1 "$T/err")"

# an uninstalled program that is a libtool wrapper script runs through libtool
WRAP=
if [ "$(head -c 2 "$CHECK_GPU")" = '#!' ] && [ -x "${top_builddir:-.}/libtool" ]; then
	WRAP="${top_builddir:-.}/libtool --mode=execute"
fi

for tool in memcheck racecheck synccheck; do
	opts="--tool $tool --error-exitcode 1"
	[ "$tool" = memcheck ] && opts="$opts --leak-check full"
	log=$T/$tool.log
	LAST_CMD=
	rc=0
	# shellcheck disable=SC2086
	MOE_GPU_TEST_QUICK=1 $WRAP "$CS" $opts "$CHECK_GPU" >"$log" 2>&1 || rc=$?
	if [ "$rc" -ne 0 ]; then
		tail -n 80 "$log" >&2
		[ "$rc" -ne 77 ] || fail "check_gpu skipped under compute-sanitizer --tool $tool, though moectl ran on the device"
		fail "compute-sanitizer $opts $CHECK_GPU: exit $rc (the last 80 lines of its output above)"
	fi
	# racecheck sums up as "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"
	case $tool in
	racecheck) summary='RACECHECK SUMMARY: [0-9]+ hazards? displayed \(0 errors,|ERROR SUMMARY: 0 errors' ;;
	*) summary='ERROR SUMMARY: 0 errors' ;;
	esac
	grep -Eq "$summary" "$log" || {
		tail -n 80 "$log" >&2
		fail "compute-sanitizer --tool $tool: no summary with 0 errors in its output"
	}
	echo "compute-sanitizer --tool $tool: $(grep -E 'SUMMARY' "$log" | tr -d '=' | tr -s ' ' | paste -s -d ';' -)"
done
exit 0
