#!/bin/sh
# SPDX-License-Identifier: MIT
#
# Stats that read right (issue 14, Deliver 6), through a real moed:
#  - tokens are tokens: 3 requests of 32 tokens are 96 tokens, and the
#    expert load says 192 token-expert pairs (top-2), not "192 tokens";
#  - the `moectl stats` that asks is not a connected client, nor listed;
#  - moectl's --json (stats, info) is one style: indented, reals at ten
#    significant digits at most (no 7.9694761649999997);
#  - the log: sessions' connect/disconnect at debug level only, every
#    line stamped with the time (stderr is not the journal);
#  - `moectl info` says why its token limit is what it is: the arena's
#    capacity (limits.segment_mb small) or limits.max_tokens_per_request.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"
PY=
for cand in "${PYTHON:-}" /usr/bin/python3; do
	[ -n "$cand" ] && "$cand" -c 'import json' 2>/dev/null && { PY=$cand; break; }
done
[ -n "$PY" ] || skip "no Python to read the JSON (tried \$PYTHON='${PYTHON:-}' and /usr/bin/python3)"
trap 'moed_stop' EXIT

gen_model "$T/hf" --arch qwen3_moe --layers 2 --hidden 256 --moe-intermediate 64 --experts 8 \
	--top-k 2 --vocab 64
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"

SOCK=$T/moed.sock
LOG=$T/moed.log
write_conf() {
	cat >"$T/moed.conf" <<EOC
model = "$T/m.moe";
backend = "cpu";
cache = { host_mb = 64; };
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
limits = { segment_mb = $1; max_tokens_per_request = $2; };
EOC
}

# ---- an arena smaller than the limit: info says the arena sets it ---------------------
write_conf 4 8192
moed_start "$T/moed.conf" "$SOCK" "$LOG"
expect_ok "$MOECTL" --socket "$SOCK" info
# float32 in and out, and the routing: 2*256*4 + 2*2*4 bytes a token
expect_out "^requests: up to [0-9]+ tokens \(the most this session's arena of [0-9.]+ MiB holds at 2064 bytes a token; limits.max_tokens_per_request may be higher\)$"
expect_ok "$MOECTL" --socket "$SOCK" info --json
"$PY" - "$T/out" <<'EOP' || fail "info --json: $(cat "$T/out")"
import json, sys
text = open(sys.argv[1]).read()
o = json.loads(text)
assert text.startswith('{\n  "'), "not indented"
assert o["max_tokens"] < 8192 and o["max_tokens"] == o["arena_bytes"] // 2064, o
EOP

# ---- 3 requests of 32 tokens to layer 1 --------------------------------------------------
for seed in 1 2 3; do
	expect_ok "$MOECTL" --socket "$SOCK" forward --layer 1 --random-input 32 --seed $seed --output "$T/y.npy"
done
expect_ok "$MOECTL" --socket "$SOCK" stats
expect_out '^moed: .*, 0 clients connected$'
grep -q '^  client ' "$T/out" && fail "stats lists the session that asked: $(cat "$T/out")"
expect_out '^requests 3 \(errors 0\) in [0-9]+ batches, 96 tokens, '
expect_out '^layer 1: 192 token-expert pairs routed, '
grep -q 'tokens routed' "$T/out" && fail "stats still calls token-expert pairs tokens: $(cat "$T/out")"
expect_ok "$MOECTL" --socket "$SOCK" stats --json
"$PY" - "$T/out" <<'EOP' || fail "stats --json: $(cat "$T/out")"
import json, re, sys
text = open(sys.argv[1]).read()
o = json.loads(text)
assert text.startswith('{\n  "'), "not indented"
assert o["tokens"] == 96 and o["requests"] == 3 and o["clients_connected"] == 0, o
assert o["clients"] == [], o["clients"]
assert isinstance(o["uptime_s"], float)
# every real at ten significant digits at most (strings hold none: paths
# are under $T, names are words)
for m in re.finditer(r'(?<![\w."])-?(\d+)\.(\d+)(?:[eE][-+]?\d+)?', text):
	digits = (m.group(1) + m.group(2)).lstrip("0")
	assert len(digits) <= 10, "too many digits: " + m.group(0)
EOP
# logs: sessions come and go at debug level (log.level is info here), and
# stderr, a file and not the journal, has each line stamped
grep -q '): connected, ' "$LOG" && fail "a session's connect logged at info level: $(cat "$LOG")"
grep -q 'session ended after' "$LOG" && fail "a session's end logged at info level: $(cat "$LOG")"
grep -q 'moed: ' "$LOG" || fail "moed logged nothing at all"
grep -Ev '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z moed: ' "$LOG" >"$T/bare" &&
	fail "log lines without a time: $(cat "$T/bare")"
moed_term "$MOED_PID" "$LOG"
MOED_PID=

# ---- the arena holds more: info names the configured limit ------------------------------
write_conf 64 1000
moed_start "$T/moed.conf" "$SOCK" "$LOG"
expect_ok "$MOECTL" --socket "$SOCK" info
expect_out '^requests: up to 1000 tokens \(limits.max_tokens_per_request\); this session.s arena: [0-9.]+ MiB$'
exit 0
