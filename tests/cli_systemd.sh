#!/bin/sh
# SPDX-License-Identifier: MIT
#
# moed as systemd runs it, without systemd:
#  - moed --check-config prints the settings of a good file and exits 0, and
#    refuses a syntax error or an unknown setting on line 3 with one line
#    that names FILE:3:;
#  - systemd-analyze verify accepts moed.service and moed.socket (when it
#    can run here);
#  - with NOTIFY_SOCKET on a stand-in for systemd (tests/notify_listen) and
#    the watchdog asked for, moed sends EXTEND_TIMEOUT_USEC before READY=1,
#    then STATUS= and WATCHDOG=1; SIGHUP gives RELOADING=1 then READY=1; a
#    reload with a bad file logs the file and line, keeps the configuration
#    and moed keeps serving; SIGTERM gives STOPPING=1 and exit 0;
#  - socket activation: moed serves the socket systemd-socket-activate
#    passes it (when that is installed).
# The notification and activation parts need moed built with libsystemd.
#
# Exit 0 pass, 1 fail, 77 skip.

set -u
. "${top_srcdir:-.}/tests/lib.sh"

: "${MOED:=${top_builddir:-.}/daemon/moed}"
NOTIFY_LISTEN=${top_builddir:-.}/tests/notify_listen
[ -x "$MOED" ] || skip "moed not found at $MOED"

# every process started here is stopped at exit, then $T goes
PIDS=
stop_all() {
	for p in $PIDS; do
		kill "$p" 2>/dev/null && sleep 0.2 && kill -9 "$p" 2>/dev/null
	done
	moe_cleanup
}
trap stop_all EXIT

# line_of PATTERN FILE: the number of the first line that matches, or 0
line_of() {
	grep -En -m1 -- "$1" "$2" | cut -d: -f1 | grep . || echo 0
}

# ---- a model and a configuration -----------------------------------------------------
gen_model "$T/hf" --arch qwen3_moe --layers 2 --hidden 256 --moe-intermediate 64 --experts 8 \
	--top-k 2 --vocab 64
expect_ok "$MOECTL" pack "$T/hf" -o "$T/m.moe"
SOCK=$T/moed.sock
write_conf() {
	cat >"$T/moed.conf" <<EOF
# moed.conf of tests/cli_systemd.sh
model = "$T/m.moe";
cache = { host_mb = $1; };
backend = "cpu";
socket = { path = "$SOCK"; mode = "0600"; group = ""; };
log = { level = "info"; };
EOF
}
write_conf 64

# ---- --check-config ----------------------------------------------------------------------
expect_ok "$MOED" --config "$T/moed.conf" --check-config
expect_out "^# $T/moed.conf: OK"
expect_out "^model = \"$T/m.moe\""
expect_out '^cache.host_mb = 64$'
expect_out '^socket.path = '
# the command line wins over the file
expect_ok "$MOED" --config "$T/moed.conf" --check-config --set cache.host_mb=128 -l debug
expect_out '^cache.host_mb = 128$'
expect_out '^log.level = "debug"$'

printf '# bad: a syntax error on line 3\nmodel = "%s";\ncache = { host_mb = ; };\n' "$T/m.moe" \
	>"$T/syntax.conf"
expect_fail "$MOED" --config "$T/syntax.conf" --check-config
expect_one_line
expect_msg "$T/syntax.conf:3:"
printf '# bad: an unknown setting on line 3\nmodel = "%s";\nfrobnicate = 3;\n' "$T/m.moe" \
	>"$T/unknown.conf"
expect_fail "$MOED" --config "$T/unknown.conf" --check-config
expect_one_line
expect_msg "$T/unknown.conf:3:.*frobnicate"
expect_fail "$MOED" --config "$T/missing.conf" --check-config
expect_one_line
expect_msg "$T/missing.conf"

# ---- the units ---------------------------------------------------------------------------
# moed.service as built, but starting the moed of this build: verify checks
# that ExecStart= can be run.  Documentation= pages are not installed yet.
if command -v systemd-analyze >/dev/null 2>&1 && [ -f "${top_builddir:-.}/etc/moed.service" ]; then
	! grep -n '@[a-z_]*@' "${top_builddir:-.}/etc/moed.service" ||
		fail "etc/moed.service has placeholders left"
	mkdir "$T/units"
	sed "s|^ExecStart=.*|ExecStart=$MOED --config $T/moed.conf|" \
		"${top_builddir:-.}/etc/moed.service" >"$T/units/moed.service"
	cp "${top_srcdir:-.}/etc/moed.socket" "$T/units/moed.socket"
	run systemd-analyze verify --man=no "$T/units/moed.service" "$T/units/moed.socket"
	if grep -Eq 'Failed to (initialize|allocate) manager|Operation not permitted|Read-only file system' \
		"$T/err"; then
		echo "systemd-analyze verify cannot run here: not checking the units" >&2
	else
		# the user and group need not exist on the machine that builds
		grep -Eiv "(user|group) [\"']?moed" "$T/err" >"$T/verify.err" || true
		[ "$rc" -eq 0 ] && [ ! -s "$T/verify.err" ] || fail "systemd-analyze verify complains about the units"
	fi
else
	echo "no systemd-analyze: not checking the units" >&2
fi

# ---- sd_notify ---------------------------------------------------------------------------
grep -q 'HAVE_SYSTEMD 1' "${top_builddir:-.}/config.h" ||
	skip "moed was built without libsystemd: no sd_notify, no socket activation"
[ -x "$NOTIFY_LISTEN" ] || skip "tests/notify_listen not built"

NOTES=$T/notify.txt
LOG=$T/moed.log
"$NOTIFY_LISTEN" "$T/notify.sock" 60 >"$NOTES" &
PIDS="$PIDS $!"
n=0
while [ ! -S "$T/notify.sock" ]; do
	n=$(( n + 1 ))
	[ "$n" -lt 50 ] || fail "notify_listen did not bind $T/notify.sock"
	sleep 0.1
done
# WATCHDOG_PID must be moed's: the shell's, which exec makes moed's
NOTIFY_SOCKET=$T/notify.sock WATCHDOG_USEC=500000 \
	sh -c 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@"' \
	"$MOED" --config "$T/moed.conf" 2>"$LOG" &
MOED_PID=$!
PIDS="$PIDS $MOED_PID"

wait_for '^READY=1$' "$NOTES"
wait_for '^STATUS=Serving qwen3_moe' "$NOTES" 3
wait_for '^WATCHDOG=1$' "$NOTES" 3
extend=$(line_of '^EXTEND_TIMEOUT_USEC=[0-9]+$' "$NOTES")
ready=$(line_of '^READY=1$' "$NOTES")
[ "$extend" -gt 0 ] && [ "$extend" -lt "$ready" ] ||
	fail "no EXTEND_TIMEOUT_USEC before READY=1: $(cat "$NOTES")"
expect_ok "$MOECTL" --socket "$SOCK" info
expect_out 'qwen3_moe'
grep -q "serving $T/m.moe" "$LOG" || fail "moed does not say what it serves: $(cat "$LOG")"

# a reload: RELOADING=1, then READY=1 again; a setting that needs a restart
# is named
write_conf 96
kill -HUP "$MOED_PID"
wait_for "reloaded $T/moed.conf" "$LOG"
wait_for '^RELOADING=1$' "$NOTES" 3
[ "$(grep -c '^READY=1$' "$NOTES")" -eq 2 ] || fail "no READY=1 after the reload: $(cat "$NOTES")"
[ "$(sed -n '/^RELOADING=1$/,$p' "$NOTES" | grep -c '^READY=1$')" -eq 1 ] ||
	fail "READY=1 does not follow RELOADING=1: $(cat "$NOTES")"
grep -q 'cache.host_mb.*next start' "$LOG" ||
	fail "a reload does not say that cache.host_mb needs a restart: $(cat "$LOG")"

# a reload with a bad file: the error names the file and line, the
# configuration in use stays, and moed goes on serving
cp "$T/syntax.conf" "$T/moed.conf"
kill -HUP "$MOED_PID"
wait_for "$T/moed.conf:3:" "$LOG"
grep "$T/moed.conf:3:" "$LOG" | grep -q 'keeping the configuration' ||
	fail "a failed reload does not say that the configuration stays: $(cat "$LOG")"
wait_for '^READY=1$' "$NOTES" 3
n=0
while [ "$(grep -c '^READY=1$' "$NOTES")" -lt 3 ]; do
	n=$(( n + 1 ))
	[ "$n" -lt 30 ] || fail "no READY=1 after the failed reload: $(cat "$NOTES")"
	sleep 0.1
done
kill -0 "$MOED_PID" 2>/dev/null || fail "moed died of a bad file at reload: $(cat "$LOG")"
expect_ok "$MOECTL" --socket "$SOCK" info
expect_out 'qwen3_moe'

# SIGTERM: STOPPING=1, exit 0, the socket file gone
moed_term "$MOED_PID" "$LOG"
# the listener writes what it got after moed sent it: wait for the line
wait_for '^STOPPING=1$' "$NOTES" 5
[ ! -e "$SOCK" ] || fail "moed left its socket $SOCK behind"
write_conf 64

# ---- socket activation -------------------------------------------------------------------
if command -v systemd-socket-activate >/dev/null 2>&1; then
	# it listens on the socket, runs moed at the first connection and
	# passes the socket as fd 3 (LISTEN_FDS=1)
	systemd-socket-activate -l "$T/activated.sock" "$MOED" --config "$T/moed.conf" \
		2>"$T/activated.log" &
	ACT_PID=$!
	PIDS="$PIDS $ACT_PID"
	n=0
	while [ ! -S "$T/activated.sock" ]; do
		n=$(( n + 1 ))
		[ "$n" -lt 50 ] || fail "systemd-socket-activate did not make its socket"
		sleep 0.1
	done
	expect_ok "$MOECTL" --socket "$T/activated.sock" info
	expect_out 'qwen3_moe'
	wait_for 'socket activation' "$T/activated.log" 3
	[ ! -e "$SOCK" ] || fail "moed made $SOCK although it was given a socket"
	kill -TERM "$ACT_PID"
	rc=0
	wait "$ACT_PID" || rc=$?
	[ "$rc" -eq 0 ] || fail "socket-activated moed exited $rc on SIGTERM: $(cat "$T/activated.log")"
else
	echo "no systemd-socket-activate: not checking socket activation" >&2
fi
exit 0
