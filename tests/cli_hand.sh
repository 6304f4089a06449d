#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moed started by hand, without systemd, just works (issue 14, 4):
#  - as a normal user with $XDG_RUNTIME_DIR and no socket configured, moed
#    serves $XDG_RUNTIME_DIR/moed.sock, says why, and `moectl info` finds it
#    without --socket or $MOED_SOCKET; no warning about the default group;
#  - as root, /run/moed is created (0755) and served: only in a private
#    mount namespace (a tmpfs on /run), or on the host when /run/moed does
#    not exist (then removed); skipped otherwise, so the host is left alone;
#  - --check-config fails, naming the setting and FILE:LINE, for a missing
#    store, a checkpoint directory given as the store (with the moectl pack
#    to run), a configured group that does not exist, an unknown user;
#  - moed started on a checkpoint directory or a .safetensors file says to
#    pack it, naming the model setting.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
[ -x "$MOED" ] || skip "moed not found at $MOED"

trap moed_stop EXIT
unset MOED_SOCKET RUNTIME_DIRECTORY LISTEN_FDS LISTEN_PID

gen_model "$T/hf" --arch qwen3_moe --layers 2 --hidden 128 --moe-intermediate 64 --experts 4 \
	--top-k 2 --vocab 64
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
chmod 0755 "$T"
chmod 0644 "$T/m.moe"

# ---- --check-config: each failure names the setting and its line ---------------------
nogroup=nosuchgroup$$
getent group "$nogroup" >/dev/null 2>&1 && skip "group $nogroup exists"
cat >"$T/bad.conf" <<EOF
# a configuration with two things wrong that only the start used to find
model = "$T/missing.moe";
socket = { path = "$T/x.sock"; group = "$nogroup"; };
EOF
run "$MOED" --config "$T/bad.conf" --check-config
[ "$rc" -eq 1 ] || fail "--check-config on a missing store and group: exit $rc, not 1: $(cat "$T/err")"
expect_msg "bad\.conf:2: model: .*missing\.moe: No such file or directory"
expect_msg "bad\.conf:3: socket\.group: group $nogroup does not exist: create it \(groupadd $nogroup\)"
grep -q ': OK' "$T/out" && fail "--check-config said OK: $(cat "$T/out")"

cat >"$T/hfdir.conf" <<EOF
model = "$T/hf";
socket = { path = "$T/x.sock"; };
EOF
run "$MOED" --config "$T/hfdir.conf" --check-config
[ "$rc" -eq 1 ] || fail "--check-config on a checkpoint directory: exit $rc: $(cat "$T/err")"
expect_msg "hfdir\.conf:1: model: .*/hf: a Hugging Face checkpoint, not a store: pack it first: moectl pack .*/hf -o STORE\.moe"

cat >"$T/user.conf" <<EOF
model = "$T/m.moe";
access = {
  uids = [ "nosuchuser$$" ];
};
EOF
run "$MOED" --config "$T/user.conf" --check-config
[ "$rc" -eq 1 ] || fail "--check-config with an unknown user: exit $rc: $(cat "$T/err")"
expect_msg "user\.conf:3: access\.uids: unknown user 'nosuchuser$$'"

# the good one says OK and where the socket would go
cat >"$T/good.conf" <<EOF
model = "$T/m.moe";
socket = { path = "$T/x.sock"; };
EOF
run "$MOED" --config "$T/good.conf" --check-config
[ "$rc" -eq 0 ] || fail "--check-config on a good configuration: exit $rc: $(cat "$T/err")"
expect_out "good\.conf: OK"
expect_out "socket \(unless systemd passes one\): $T/x\.sock: socket\.path \(.*good\.conf:2\)"

# ---- moed started on a checkpoint: pack it first ---------------------------------
run "$MOED" --config "$T/good.conf" -m "$T/hf" -b cpu
[ "$rc" -eq 1 ] || fail "moed on a checkpoint directory: exit $rc: $(cat "$T/err")"
expect_msg "the command line: model: .*/hf: a Hugging Face checkpoint, not a store: pack it first: moectl pack"
st=$(ls "$T/hf"/*.safetensors | head -n 1)
run "$MOED" --config "$T/good.conf" -m "$st" -b cpu
[ "$rc" -eq 1 ] || fail "moed on a .safetensors file: exit $rc: $(cat "$T/err")"
expect_msg "model: .*\.safetensors: a \.safetensors file of a checkpoint, not a store: pack its checkpoint directory first: moectl pack DIR -o STORE\.moe"

# ---- by hand as a normal user: $XDG_RUNTIME_DIR ------------------------------------
# the configuration names no socket (and the default group "moed")
cat >"$T/hand.conf" <<EOF
model = "$T/m.moe";
backend = "cpu";
cache = { host_mb = 64; };
EOF
chmod 0644 "$T/hand.conf"
mkdir "$T/xdg"
as_user=
if [ "$(id -u)" -eq 0 ]; then
	command -v setpriv >/dev/null 2>&1 || skip "running as root without setpriv to become a user"
	as_user="setpriv --reuid=65534 --regid=65534 --clear-groups --"
	chown 65534:65534 "$T/xdg"
fi
chmod 0700 "$T/xdg"
if [ -n "$as_user" ] && ! $as_user sh -c "test -x '$MOED' && test -x '$MOECTL' && test -r '$T/m.moe'"; then
	echo "SKIP (part): the build tree or $T is out of reach of the user (uid 65534) the test becomes"
elif [ -e /run/moed/moed.sock ]; then
	echo "SKIP (part): /run/moed/moed.sock exists here; a client would rightly take it"
elif $as_user test -w /run/moed 2>/dev/null; then
	echo "SKIP (part): /run/moed is writable by the test user; moed rightly takes it"
else
	env XDG_RUNTIME_DIR="$T/xdg" $as_user "$MOED" --config "$T/hand.conf" 2>"$T/hand.log" &
	MOED_PID=$!
	wait_for "serving " "$T/hand.log"
	grep -Eq "socket $T/xdg/moed\.sock: not root and /run/moed is not writable: \\\$XDG_RUNTIME_DIR" \
		"$T/hand.log" || fail "moed does not say it serves \$XDG_RUNTIME_DIR/moed.sock and why: $(cat "$T/hand.log")"
	grep -q "group moed does not exist" "$T/hand.log" &&
		fail "moed warns about the default group it was never told to use: $(cat "$T/hand.log")"
	run env XDG_RUNTIME_DIR="$T/xdg" $as_user "$MOECTL" info
	[ "$rc" -eq 0 ] || fail "moectl info without --socket does not find \$XDG_RUNTIME_DIR/moed.sock: $(cat "$T/err")"
	expect_out "qwen3_moe"
	kill "$MOED_PID"
	wait "$MOED_PID" || fail "moed by hand did not stop cleanly: $(cat "$T/hand.log")"
	MOED_PID=
	[ -e "$T/xdg/moed.sock" ] && fail "moed left its socket $T/xdg/moed.sock"
	# and with neither, the client's error says where it looked
	run env XDG_RUNTIME_DIR="$T/xdg" $as_user "$MOECTL" info
	[ "$rc" -ne 0 ] || fail "moectl info with no moed succeeded"
	expect_msg "XDG_RUNTIME_DIR/moed\.sock, where a moed started by hand puts it"
fi

# ---- by hand as root: /run/moed created ------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
	echo "SKIP (part): not root; /run/moed is root's"
	exit 0
fi
cat >"$T/root.sh" <<EOF
set -u
ns=\$1
if [ "\$ns" = ns ]; then
	mount -t tmpfs -o mode=0755 tmpfs /run || exit 3
fi
umask 077
"$MOED" --config "$T/hand.conf" 2>"$T/root.log" &
pid=\$!
n=0
until [ -S /run/moed/moed.sock ]; do
	n=\$((n + 1)); [ \$n -lt 100 ] || { kill \$pid; exit 4; }
	sleep 0.1
done
"$MOECTL" info >"$T/root.out" 2>&1; r=\$?
stat -c %a /run/moed >"$T/root.mode"
kill \$pid; wait \$pid || r=5
[ "\$ns" = ns ] || rmdir /run/moed
exit \$r
EOF
if unshare -m --propagation private true 2>/dev/null; then
	env -u XDG_RUNTIME_DIR unshare -m --propagation private sh "$T/root.sh" ns
	r=$?
elif [ ! -e /run/moed ]; then
	env -u XDG_RUNTIME_DIR sh "$T/root.sh" host
	r=$?
else
	echo "SKIP (part): no private mount namespace and /run/moed exists; not touching it"
	exit 0
fi
[ "$r" -eq 0 ] || fail "moed by hand as root on /run/moed/moed.sock: $r: $(cat "$T/root.log" "$T/root.out" 2>/dev/null)"
grep -q "socket /run/moed/moed.sock: the default; running as root, created /run/moed" "$T/root.log" ||
	fail "moed does not say it made /run/moed: $(cat "$T/root.log")"
[ "$(cat "$T/root.mode")" = 755 ] || fail "/run/moed is $(cat "$T/root.mode"), not 755 (umask 077)"
grep -q qwen3_moe "$T/root.out" || fail "moectl info as root: $(cat "$T/root.out")"
exit 0
