#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moectl's and moed's command-line convention and exit statuses
# (moectl(1) and moed(8), EXIT STATUS): global options before or after the
# command, -V and -h everywhere, a full --help per command, "did you mean"
# for typos, and for each kind of failure its own status and a message that
# names the culprit and the next step:
#
#   1 bad input, 2 usage, 3 cannot reach moed, 4 refused, 5 I/O or
#   checksum, 6 internal (not provoked here: out of memory).
#
# A real moed on a temporary socket gives the refusals and the stale socket.
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"
export LC_ALL=C
unset MOED_SOCKET

# status N CMD...: run CMD, fail unless it exits N with one line on stderr
status() {
	want=$1
	shift
	run "$@"
	[ "$rc" -eq "$want" ] || fail "exit status $rc, expected $want: $*"
	if [ "$want" -ne 0 ]; then
		expect_one_line
	fi
}

# --- the convention -----------------------------------------------------------
run "$MOECTL"
[ "$rc" -eq 2 ] || fail "moectl without a command: exit $rc, expected 2"
expect_msg "^usage: moectl"
status 2 "$MOECTL" stast
expect_msg "^moectl: unknown command 'stast'; did you mean 'stats'\? \(see moectl --help\)$"
status 2 "$MOECTL" frobnicate
expect_msg "^moectl: unknown command 'frobnicate' \(see moectl --help\)$"
status 2 "$MOECTL" --sockt x info
expect_msg "did you mean '--socket'"
status 2 "$MOECTL" info --sock x
expect_msg "^moectl: info: unknown option '--sock'; did you mean '--socket'"
status 2 "$MOECTL" forward --layr 1
expect_msg "^moectl: forward: unknown option '--layr'; did you mean '--layer'"
status 2 "$MOECTL" gen-model --arhc qwen3_moe
expect_msg "did you mean '--arch'"
status 2 "$MOECTL" pack -o
expect_msg "^moectl: pack: -o needs a value \(see moectl pack --help\)$"
status 2 "$MOECTL" inspect
expect_msg "inspect: missing STORE"
status 2 "$MOECTL" --socket
for v in -V --version; do
	status 0 "$MOECTL" $v
	expect_out "^moectl [0-9]+\.[0-9]+\.[0-9]+$"
	status 0 "$MOED" $v
	expect_out "^moed [0-9]+\.[0-9]+\.[0-9]+$"
done
status 0 "$MOECTL" --help
expect_out "^  stats"
expect_out "Exit status"
# every command has a help of its own, not one line
for cmd in gen-model pack inspect fingerprint verify forward trace-sim info stats bench; do
	for h in -h --help; do
		status 0 "$MOECTL" "$cmd" "$h"
		expect_out "^usage: moectl .*$cmd"
		[ "$(wc -l <"$T/out")" -ge 4 ] || fail "moectl $cmd $h prints $(wc -l <"$T/out") lines"
	done
done
status 2 "$MOED" --modle x
expect_msg "^moed: unknown option '--modle'; did you mean '--model'\? \(see moed --help\)$"
status 2 "$MOED" extra-argument

# --- bash completion (etc/moectl.bash-completion), on the programs built here ----
# complete_words PROGRAM ARGS...: the completions of the last word
complete_words() {
	bash -c '. "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
		case ${1##*/} in moed) _moed ;; *) _moectl ;; esac
		printf "%s\n" "${COMPREPLY[@]}"' complete "${top_srcdir:-.}/etc/moectl.bash-completion" "$@"
}
if command -v bash >/dev/null 2>&1; then
	[ "$(complete_words "$MOECTL" sta)" = "stats" ] || fail "completion of 'moectl sta'"
	complete_words "$MOECTL" --socket x pa | grep -qx pack || fail "completion after --socket x"
	complete_words "$MOECTL" pack --ou | grep -qx -- --output || fail "completion of 'pack --ou'"
	complete_words "$MOECTL" forward --lay | grep -qx -- --layer || fail "completion of 'forward --lay'"
	complete_words "$MOED" --chec | grep -qx -- --check-config || fail "completion of 'moed --chec'"
	complete_words "$MOED" --backend c | grep -qx cuda || fail "completion of 'moed --backend c'"
fi

# --- cannot reach moed: 3, with the socket and the fix --------------------------
status 3 "$MOECTL" --socket "$T/none.sock" info
expect_msg "^moectl: info: cannot connect to moed at $T/none.sock: no such socket; .*systemctl start moed.socket"
# the socket option after the command, in both forms
status 3 "$MOECTL" stats --socket "$T/none.sock"
expect_msg "moed at $T/none.sock"
status 3 "$MOECTL" info --json --socket="$T/none.sock"
expect_msg "moed at $T/none.sock"
: >"$T/file"
status 3 "$MOECTL" --socket "$T/file" info
expect_msg "moed at $T/file: not a socket"

# --- a real moed: a stale socket, refusals, a layer it does not serve ------------
gen_model "$T/hf" --arch qwen3_moe --layers 2 --hidden 64 --moe-intermediate 32 --experts 4 \
	--top-k 2 --vocab 32
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
SOCK=$T/moed.sock
cat >"$T/moed.conf" <<CONF
model = "$T/m.moe";
backend = "cpu";
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
limits = { max_clients = 1; };
log = { level = "debug"; ratelimit_burst = 100000; };
CONF
moed_start "$T/moed.conf" "$SOCK" "$T/moed.log"
status 0 "$MOECTL" info --socket "$SOCK"
expect_out "qwen3_moe"

# a layer the model does not have: bad input (1), the served layers named
"$MOECTL" forward --model "$T/m.moe" --layer 0 --random-input 2 --save-input "$T/in.npy" \
	--output "$T/o.npy" >/dev/null 2>&1 || fail "forward --model"
status 1 "$MOECTL" --socket "$SOCK" forward --layer 7 --input "$T/in.npy" --output "$T/o.npy"
expect_msg "layer 7 is not an MoE layer of the model moed serves \(qwen3_moe\); its MoE layers are 0, 1"

# refused by moed (limits.max_clients = 1, one client holds it): 4, with
# moed's own reason.  bench connects twice, once to learn the model and then
# its client, which holds the only slot until it is killed; moed's debug
# log says when that second session is in (nothing else connects meanwhile)
connected() { grep -c '): connected, ' "$T/moed.log"; }
before=$(connected)
"$MOECTL" --socket "$SOCK" bench --clients 1 --duration 60 --warmup 0 >"$T/bench.out" 2>&1 &
bench=$!
n=0
while [ "$(connected)" -lt $((before + 2)) ]; do
	n=$((n + 1))
	[ "$n" -lt 300 ] || fail "bench's client did not connect in 30 s: $(cat "$T/bench.out")"
	kill -0 "$bench" 2>/dev/null || fail "bench ended before its client held the slot: $(cat "$T/bench.out")"
	sleep 0.1
done
status 4 "$MOECTL" --socket "$SOCK" info
expect_msg "^moectl: info: moed at $SOCK refused this client: .*limits\.max_clients"
kill "$bench" 2>/dev/null
wait "$bench" 2>/dev/null

# refused by the socket's permissions (not as root: root passes them)
if [ "$(id -u)" -ne 0 ]; then
	chmod 0 "$SOCK"
	status 4 "$MOECTL" --socket "$SOCK" info
	expect_msg "permission denied \(mode 0000, owner [^,]*, group [^)]*\); join group"
	chmod 0600 "$SOCK"
fi

# a socket nobody listens on, left by a moed that was killed: 3
kill -9 "$MOED_PID"
wait "$MOED_PID" 2>/dev/null
MOED_PID=
[ -S "$SOCK" ] || fail "moed killed with SIGKILL left no socket behind"
status 3 "$MOECTL" --socket "$SOCK" info
expect_msg "moed at $SOCK: nothing listens there"

# --- I/O and checksums: 5 ---------------------------------------------------------
cp "$T/m.moe" "$T/bad.moe"
printf 'XXXX' | dd of="$T/bad.moe" bs=1 seek=16 conv=notrunc 2>/dev/null
status 5 "$MOECTL" verify "$T/bad.moe"
run "$MOED" --model "$T/bad.moe" --socket "$T/bad.sock" --set log.level=err
[ "$rc" -eq 5 ] || fail "moed on a store with a bad header checksum: exit $rc, expected 5"
status 1 "$MOED" --model "$T/missing.moe" --socket "$T/bad.sock"
expect_msg "missing.moe"
exit 0
