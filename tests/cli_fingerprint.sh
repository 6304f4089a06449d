#!/bin/sh
# SPDX-License-Identifier: MIT
#
# Checkpoint fingerprints through the programs (moe_checkpoint_fingerprint(3),
# moe-store(5) FINGERPRINT):
#  - moectl fingerprint DIR, moectl inspect (text and --json) of the store
#    moectl pack made from DIR, and moectl info from a moed serving it all
#    give the same 32 hex digits, for a sharded checkpoint too;
#  - a copy of DIR gives the same, one changed byte of config.json or
#    another seed another;
#  - a directory pack can read but not fingerprint (a stray broken
#    *.safetensors beside model.safetensors) is packed with a warning and
#    no fingerprint: inspect and info say "none";
#  - moectl fingerprint refuses a missing directory, a missing config.json,
#    a directory without *.safetensors and a truncated header in one line
#    that names the file.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"

trap moed_stop EXIT

HEX='^[0-9a-f]{32}$'

# fingerprint DIR: $fp, what moectl fingerprint prints
fingerprint() {
	expect_ok "$MOECTL" fingerprint "$1"
	fp=$(cat "$T/out")
	echo "$fp" | grep -Eq "$HEX" || fail "moectl fingerprint $1 printed '$fp'"
}

# store_fp STORE: $sfp, the fingerprint inspect shows ("none" or hex), the
# same in --json (null for none)
store_fp() {
	expect_ok "$MOECTL" inspect "$1"
	sfp=$(sed -n 's/^fingerprint: *//p' "$T/out")
	[ -n "$sfp" ] || fail "inspect $1 shows no fingerprint line: $(cat "$T/out")"
	expect_ok "$MOECTL" inspect --json "$1"
	if [ "$sfp" = none ]; then
		grep -Eq '"fingerprint": null' "$T/out" || fail "inspect --json $1: fingerprint not null"
	else
		grep -Fq "\"fingerprint\": \"$sfp\"" "$T/out" || fail "inspect --json $1 lacks \"$sfp\""
	fi
}

# ---- pack records what moectl fingerprint prints -------------------------------------
gen_model "$T/hf" --arch deepseek_v3 --layers 3 --hidden 256 --moe-intermediate 64 --experts 16 \
	--vocab 64 --shard-mb 1 --seed 3
[ "$(ls "$T/hf"/*.safetensors | wc -l)" -gt 1 ] || fail "the checkpoint is not sharded"
fingerprint "$T/hf"
F=$fp
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
[ ! -s "$T/err" ] || fail "pack said something on stderr: $(cat "$T/err")"
store_fp "$T/m.moe"
[ "$sfp" = "$F" ] || fail "inspect shows $sfp, moectl fingerprint $F"

# the same bytes elsewhere: the same; one byte of config.json, or another seed: another
cp -r "$T/hf" "$T/hf2" || fail "cp"
fingerprint "$T/hf2"
[ "$fp" = "$F" ] || fail "a copy gives $fp, the original $F"
sed 's/"vocab_size": 64/"vocab_size": 65/' "$T/hf2/config.json" >"$T/c.json" && mv "$T/c.json" "$T/hf2/config.json"
cmp -s "$T/hf/config.json" "$T/hf2/config.json" && fail "config.json was not changed"
fingerprint "$T/hf2"
[ "$fp" != "$F" ] || fail "a changed config.json left the fingerprint $F"
gen_model "$T/hf3" --arch deepseek_v3 --layers 3 --hidden 256 --moe-intermediate 64 --experts 16 \
	--vocab 64 --shard-mb 1 --seed 4
fingerprint "$T/hf3"
[ "$fp" != "$F" ] || fail "another seed gives the same fingerprint $F"

# ---- a directory pack reads but cannot fingerprint -----------------------------------
gen_model "$T/hf4" --arch qwen3_moe --layers 2 --hidden 64 --moe-intermediate 32 --experts 8 --vocab 64
printf 'abc' >"$T/hf4/stray.safetensors"
expect_ok "$MOECTL" pack "$T/hf4" -o "$T/none.moe"
expect_msg "^moectl: warning: pack: no fingerprint recorded in .*none.moe: .*stray.safetensors"
expect_one_line
store_fp "$T/none.moe"
[ "$sfp" = none ] || fail "a store packed without a fingerprint shows '$sfp'"

# ---- errors name the file --------------------------------------------------------------
expect_fail "$MOECTL" fingerprint "$T/nowhere"
expect_msg "^moectl: fingerprint: .*/nowhere: no such directory"
expect_one_line
mkdir "$T/empty" || fail "mkdir"
expect_fail "$MOECTL" fingerprint "$T/empty"
expect_msg "empty/config.json: not found"
expect_one_line
cp "$T/hf4/config.json" "$T/empty/" || fail "cp"
expect_fail "$MOECTL" fingerprint "$T/empty"
expect_msg "empty: no \*\.safetensors file"
expect_one_line
expect_fail "$MOECTL" fingerprint "$T/hf4"
expect_msg "hf4/stray.safetensors: 3 bytes, too short"
expect_one_line
f=$(ls "$T/hf2"/*.safetensors | head -n 1)
head -c 20 "$f" >"$T/short" && mv "$T/short" "$f"
expect_fail "$MOECTL" fingerprint "$T/hf2"
expect_msg "$(basename "$f"): header length [0-9]+ lies past the file's 20 bytes"
expect_one_line
expect_fail "$MOECTL" fingerprint
expect_msg "missing HF_DIR"

# ---- moed reports it --------------------------------------------------------------------
SOCK=$T/moed.sock
LOG=$T/moed.log
# serve STORE: moed on STORE, answering on $SOCK
serve() {
	cat >"$T/moed.conf" <<EOF
# moed.conf of tests/cli_fingerprint.sh
model = "$1";
backend = "cpu";
cache = { host_mb = 64; };
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
log = { level = "info"; };
EOF
	moed_start "$T/moed.conf" "$SOCK" "$LOG"
}

serve "$T/m.moe"
expect_ok "$MOECTL" --socket "$SOCK" info
expect_out "^fingerprint: $F\$"
expect_ok "$MOECTL" --socket "$SOCK" info --json
expect_out "\"fingerprint\": \"$F\""
moed_term "$MOED_PID" "$LOG"
MOED_PID=

serve "$T/none.moe"
expect_ok "$MOECTL" --socket "$SOCK" info
expect_out "^fingerprint: none\$"
expect_ok "$MOECTL" --socket "$SOCK" info --json
expect_out '"fingerprint": null'
moed_term "$MOED_PID" "$LOG"
MOED_PID=

exit 0
