#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moed quick start: generate a small DeepSeek-V3-shaped checkpoint, pack it
# into a .moe store, run one of its MoE layers on batches of 1, 16 and 256
# random tokens, compare with the same layer computing every expert, serve
# the same model in FP8 as DeepSeek-V3 is released (its bytes per expert and
# tokens/s against bf16), and run every MoE layer with only a third of the
# model in memory, the rest paged in from the store, with and without
# prefetching; then, where a Python with torch and transformers is found,
# several Python processes generating with a transformers model whose
# experts moed serves (examples/python_serve.py).
#
#   ./demo.sh                  after a build in the source tree
#   BUILD_DIR=../build ./demo.sh
#   DEMO_DIR=/scratch ./demo.sh  where the temporary files go (default /tmp);
#                                about 1.8 GB, removed at the end
#
# Exits non-zero if any step fails.

set -u

src=$(cd "$(dirname "$0")" && pwd)
BUILD_DIR=${BUILD_DIR:-$src}
MOECTL=${MOECTL:-$BUILD_DIR/client/moectl}
MOED=${MOED:-$BUILD_DIR/daemon/moed}
REPEAT=${REPEAT:-5}   # runs per batch: the first loads the experts, the best of the rest is shown

die() {
	echo "demo: $*" >&2
	exit 1
}

[ "$REPEAT" -ge 2 ] 2>/dev/null || die "REPEAT must be at least 2"
[ -x "$MOECTL" ] || die "no moectl at $MOECTL: build first (./configure && make), or set BUILD_DIR"
[ -x "$MOED" ] || die "no moed at $MOED: build first (./configure && make), or set BUILD_DIR"

parent=${DEMO_DIR:-${TMPDIR:-/tmp}}
mkdir -p "$parent" || die "cannot create $parent"
avail=$(df -Pk "$parent" | awk 'NR == 2 { print $4 }')
[ "${avail:-0}" -gt 1800000 ] || die "$parent has $((${avail:-0} / 1024)) MB free; the demo needs 1.8 GB (set DEMO_DIR)"
work=$(mktemp -d "$parent/moed-demo-XXXXXX") || die "cannot create a directory in $parent"
moed_pid=
trap '[ -n "$moed_pid" ] && kill "$moed_pid" 2>/dev/null; rm -rf "$work"' EXIT
trap 'exit 1' HUP INT TERM

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run LOG CMD...: run a step, keep its output in LOG, stop the demo if it fails.
run() {
	log=$1
	shift
	if ! "$@" >"$log" 2>&1; then
		sed 's/^/  | /' "$log" >&2
		die "failed: $*"
	fi
}

# field LOG PATTERN: the first number after PATTERN in LOG.
# field FILE LABEL: the first number after LABEL in FILE.  forward --stats
# prints "later runs: X ms mean, Y ms min", so LABEL "ms mean," gives the
# best (minimum) time.
field() {
	sed -n "s/.*$2 *\([0-9][0-9.]*\).*/\1/p" "$1" | head -n 1
}

# The shape.  DeepSeek-V3 itself: hidden 7168, 256 experts of 2048, top-8 in
# 4 of 8 groups, 1 shared expert: 88 MB per expert in bf16, too much for a
# demo.  This keeps the routing and the shared expert and shrinks the rest.
H=2048 I=512 E=64 K=8 G=8 KG=4 SHARED=1 LAYERS=3 LAYER=1

echo "moed demo: one MoE layer of a small DeepSeek-V3-shaped model"
echo "model: deepseek_v3 layout, hidden $H, $E routed experts (intermediate $I) + $SHARED shared,"
echo "       top-$K in $KG of $G groups, sigmoid routing with correction bias, bf16 weights,"
echo "       $LAYERS layers (layer 0 dense), skewed routing as trained models have (--router-skew 1);"
echo "       DeepSeek-V3 itself: hidden 7168, 256 experts of 2048"

t0=$(now)
run "$work/gen.log" "$MOECTL" gen-model --arch deepseek_v3 --layers $LAYERS --first-dense 1 \
	--hidden $H --moe-intermediate $I --intermediate $((2 * I)) --experts $E --top-k $K \
	--groups $G --topk-group $KG --shared-experts $SHARED --vocab 1024 --mtp-layers 0 \
	--router-skew 1 --seed 1 -o "$work/hf"
echo "[1/7] gen-model: $(du -sh "$work/hf" | cut -f1)B random checkpoint in $(since "$t0") s"

t0=$(now)
run "$work/pack.log" "$MOECTL" pack "$work/hf" -o "$work/model.moe"
rm -rf "$work/hf"
run "$work/verify.log" "$MOECTL" verify "$work/model.moe"
echo "[2/7] pack: $(du -sh "$work/model.moe" | cut -f1)B store in $(since "$t0") s, every checksum verified"

echo "[3/7] forward, layer $LAYER (first run reads the experts it needs from the store;"
echo "      then the best of $((REPEAT - 1)) runs):"
printf '      %6s  %12s  %12s  %10s\n' tokens "first run" "per batch" "tokens/s"
for T in 1 16 256; do
	run "$work/fwd$T.log" "$MOECTL" forward --model "$work/model.moe" --layer $LAYER \
		--random-input $T --repeat "$REPEAT" --stats --top 8
	first=$(field "$work/fwd$T.log" "first run:")
	best=$(field "$work/fwd$T.log" "ms mean,")
	[ -n "$first" ] && [ -n "$best" ] || die "no timing in the output of forward ($work/fwd$T.log)"
	awk -v t=$T -v f="$first" -v b="$best" \
		'BEGIN { printf "      %6d  %9.1f ms  %9.2f ms  %10.0f\n", t, f, b, t / (b / 1e3) }'
done
backend=$(sed -n 's/^backend: \([a-z]*\).*/\1/p' "$work/fwd256.log")
echo "      (backend: ${backend:-?}; $(nproc 2>/dev/null || echo ?) CPUs)"
echo "      load of the $E experts for the 256-token batch (tokens per expert, busiest first):"
sed -n '/^expert load/,/^imbalance/p' "$work/fwd256.log" | sed '1d; s/^ *//; s/^/        /'

run "$work/dense.log" "$MOECTL" forward --model "$work/model.moe" --layer $LAYER \
	--random-input 256 --repeat "$REPEAT" --stats --all-experts
dense=$(field "$work/dense.log" "ms mean,")
[ -n "$dense" ] || die "no timing in the output of forward --all-experts"
awk -v e=$E -v d="$dense" 'BEGIN {
	printf "[4/7] the same 256 tokens through all %d experts (--all-experts): %.2f ms per batch\n", e, d
}'
awk -v s="$best" -v d="$dense" -v e=$E -v k=$K -v sh=$SHARED 'BEGIN {
	printf "      top-%d of %d experts: %.1fx faster than computing every expert\n", k, e, d / s
	printf "      (ideal %.1fx: %d instead of %d expert FFNs per token, counting the shared one)\n",
		(e + sh) / (k + sh), k + sh, e + sh
}'
# The checkpoints people download are rarely bf16: DeepSeek-V3 is released
# in FP8 with 128x128 block scales.  moed keeps those bytes as they are.
t0=$(now)
run "$work/gen8.log" "$MOECTL" gen-model --arch deepseek_v3 --layers $LAYERS --first-dense 1 \
	--hidden $H --moe-intermediate $I --intermediate $((2 * I)) --experts $E --top-k $K \
	--groups $G --topk-group $KG --shared-experts $SHARED --vocab 1024 --mtp-layers 0 \
	--router-skew 1 --seed 1 --quant fp8 -o "$work/hf8"
run "$work/pack8.log" "$MOECTL" pack "$work/hf8" -o "$work/fp8.moe"
rm -rf "$work/hf8"
run "$work/inspect.log" "$MOECTL" inspect "$work/model.moe"
run "$work/inspect8.log" "$MOECTL" inspect "$work/fp8.moe"
b16=$(field "$work/inspect.log" "expert blob:")
b8=$(field "$work/inspect8.log" "expert blob:")
[ -n "$b16" ] && [ -n "$b8" ] || die "no expert blob size in the output of inspect"
echo "[5/7] the same model as DeepSeek-V3 is released, FP8 with 128x128 block scales,"
echo "      packed in its own bytes ($(since "$t0") s):"
awk -v a="$b16" -v b="$b8" 'BEGIN {
	printf "      bytes per expert: %.2f MB in bf16, %.2f MB in FP8 (%.2fx fewer)\n", a / 1e6, b / 1e6, a / b
}'
printf '      %6s  %14s  %14s  %8s\n' tokens "bf16 tokens/s" "FP8 tokens/s" "FP8/bf16"
for T in 1 16; do
	run "$work/fwd8_$T.log" "$MOECTL" forward --model "$work/fp8.moe" --layer $LAYER \
		--random-input $T --repeat "$REPEAT" --stats
	b=$(field "$work/fwd$T.log" "ms mean,")
	f=$(field "$work/fwd8_$T.log" "ms mean,")
	[ -n "$b" ] && [ -n "$f" ] || die "no timing in the output of forward ($work/fwd8_$T.log)"
	awk -v t=$T -v b="$b" -v f="$f" \
		'BEGIN { printf "      %6d  %14.0f  %14.0f  %7.2fx\n", t, t / (b / 1e3), t / (f / 1e3), b / f }'
done
rm -f "$work/fp8.moe"
# Paging: a third of the routed experts fit in the host cache.
store_mb=$(( $(wc -c <"$work/model.moe") / 1048576 ))
budget=$(( store_mb / 3 ))
echo "[6/7] every MoE layer on 4-token batches (40 different ones, after a first one that"
echo "      fills the cache) with a host budget of $budget MiB, a third of the $store_mb MiB store:"
echo "      the rest is read from the store with io_uring while resident experts compute"
printf '      %-12s %9s %8s %10s %10s %9s %15s\n' prefetch "ms/batch" "hit" "MiB read" "stall ms" "MB/s" "prec/recall"
for pf in off on; do
	opt=
	[ $pf = on ] && opt=--prefetch
	# shellcheck disable=SC2086
	run "$work/page$pf.log" "$MOECTL" forward --model "$work/model.moe" --layer all \
		--random-input 4 --repeat 41 --fresh-input --host-cache-mb $budget $opt --stats
	ms=$(field "$work/page$pf.log" "later runs:")
	bw=$(sed -n 's/.* \([0-9][0-9]*\) MB\/s while busy.*/\1/p' "$work/page$pf.log")
	awk -v pf=$pf -v ms="$ms" -v bw="${bw:-0}" '$1 == "total" {
		prec = NF >= 10 ? $9 " / " $10 : "-"
		printf "      %-12s %9.1f %8s %10.0f %10.0f %9d %15s\n", pf, ms, $4, $6, $8, bw, prec
	}' "$work/page$pf.log"
done
sed -n 's/^pager: /      pager: /p; s/^peak resident memory: /      peak resident memory: /p' "$work/pageon.log"
echo "      (hit: experts a batch found in memory; stall: time waiting for reads, all batches;"
echo "       precision / recall: how well layer L's input predicts layer L+1's experts)"

# The daemon: one resident copy of the model served to several processes.
cat >"$work/moed.conf" <<EOF
model = "$work/model.moe";
socket = { path = "$work/moed.sock"; group = ""; };
cache = { host_mb = $((store_mb + 64)); };
EOF
"$MOED" --config "$work/moed.conf" >"$work/moed.log" 2>&1 &
moed_pid=$!
i=0
until "$MOECTL" --socket "$work/moed.sock" info >/dev/null 2>&1; do
	i=$((i + 1))
	if [ $i -gt 300 ] || ! kill -0 "$moed_pid" 2>/dev/null; then
		sed 's/^/  | /' "$work/moed.log" >&2
		die "moed did not start"
	fi
	sleep 0.1
done
echo "[7/7] moed serving the store on $work/moed.sock (pid $moed_pid); clients are"
echo "      separate processes that share its one copy of the experts and its batches"
run "$work/same1.log" "$MOECTL" --socket "$work/moed.sock" forward --layer $LAYER --random-input 16 \
	--output "$work/d.npy"
run "$work/same2.log" "$MOECTL" forward --model "$work/model.moe" --layer $LAYER --random-input 16 \
	--output "$work/m.npy"
cmp -s "$work/d.npy" "$work/m.npy" || die "moed's output differs from the in-process forward"
echo "      moectl forward through moed gives the same bits as in-process: yes"
printf '      %8s %12s %12s %10s %10s\n' clients "tokens/s" "requests/s" "p50 us" "p99 us"
for n in 1 4; do
	run "$work/bench$n.log" "$MOECTL" --socket "$work/moed.sock" bench --clients $n --tokens 4 \
		--layer $LAYER --duration 2 --warmup 0.5 --json
	sed -n 's/.*"tokens_per_s": \([0-9.]*\).*"p50": \([0-9.]*\), "p90": [0-9.]*, "p99": \([0-9.]*\).*/\1 \2 \3/p' \
		"$work/bench$n.log" | awk -v n=$n '{ printf "      %8d %12.0f %12.0f %10.1f %10.1f\n", n, $1, $1 / 4, $2, $3 }'
done
echo "      (each client sends 4-token requests to layer $LAYER back to back for 2 s)"
run "$work/stats.log" "$MOECTL" --socket "$work/moed.sock" stats
echo "      moectl stats:"
sed -n '1,12p' "$work/stats.log" | sed 's/^/        /'
kill "$moed_pid"
wait "$moed_pid" || die "moed did not stop cleanly (log: $work/moed.log)"
moed_pid=
echo "      moed stopped cleanly on SIGTERM"

# The same for Python processes running a Hugging Face transformers model,
# where a Python with torch and transformers >= 5 is found (python/README.md).
py=
for cand in "${MOED_PYTHON:-}" "$BUILD_DIR/venv/bin/python" "$src/build/venv/bin/python" python3; do
	[ -n "$cand" ] || continue
	if "$cand" -c 'import sys, torch, transformers
sys.exit(int(transformers.__version__.split(".")[0]) < 5)' >/dev/null 2>&1; then
		py=$cand
		break
	fi
done
if [ -n "$py" ]; then
	echo "[+] Python: 4 processes run a transformers model (a small random qwen3_moe) and"
	echo "    generate at once, each without the experts, which one moed serves to all"
	echo "    (examples/python_serve.py with $py)"
	run "$work/py.log" env PYTHONPATH="$src/python${PYTHONPATH:+:$PYTHONPATH}" \
		MOED_LIBRARY="${MOED_LIBRARY:-$BUILD_DIR/libmoeclient/.libs/libmoeclient.so.0}" \
		MOECTL="$MOECTL" MOED="$MOED" TMPDIR="$work" \
		"$py" "$src/examples/python_serve.py" --processes 4 --tokens 32
	sed -n '/processes, /,$p' "$work/py.log" | sed 's/^/      /'
else
	echo "[+] Python: skipped: no Python with torch and transformers >= 5 (MOED_PYTHON,"
	echo "    build/venv, python3); python/README.md says how to make one"
fi
echo "done; removing $work"

