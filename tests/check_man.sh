#!/bin/sh
# SPDX-License-Identifier: MIT
#
# The man pages format without a warning and keep the sections man-pages(7)
# expects.  For every page under man/:
#
#   - groff formats it with all warnings on (-ww, as `man --warnings=all`
#     would) and prints nothing on standard error;
#   - a page that is only ".so man3/other.3" names a page that exists;
#   - no section heading (.SH) appears twice in one page;
#   - EXIT STATUS appears only in sections 1 and 8 (man-pages(7): the
#     status of a program belongs to the program's page, not to a file
#     format's or a function's).
#
# Needs groff (Debian's groff-base, which man-db uses); without it the test
# says so and exits 77.  By hand: top_srcdir=. sh tests/check_man.sh.
# Exit 0 pass, 1 fail.

set -u
: "${top_srcdir:=.}"
LC_ALL=C.UTF-8
export LC_ALL

if ! command -v groff >/dev/null 2>&1; then
	echo "SKIP: groff is not installed (Debian: apt-get install groff-base)"
	exit 77
fi

err=$(mktemp "${TMPDIR:-/tmp}/moe-man.XXXXXX") || exit 1
trap 'rm -f "$err"' EXIT
trap 'exit 1' INT TERM HUP

fail=0
n=0
for page in "$top_srcdir"/man/*.[1-8]; do
	name=${page##*/}
	sect=${name##*.}
	n=$((n + 1))
	first=$(sed -n 1p "$page")
	case $first in
	.so\ *)
		target=${first#.so }
		if [ ! -f "$top_srcdir/man/${target##*/}" ]; then
			echo "FAIL: man/$name: .so names $target, which is not under man/" >&2
			fail=1
		fi
		continue ;;
	esac
	if ! groff -man -t -ww -z -Tutf8 "$page" 2>"$err" || [ -s "$err" ]; then
		echo "FAIL: man/$name: groff warns:" >&2
		sed 's/^/    /' "$err" >&2
		fail=1
	fi
	dups=$(sed -n 's/^\.SH[ 	]*"\{0,1\}\([^"]*\)"\{0,1\}[ 	]*$/\1/p' "$page" | sort | uniq -d)
	if [ -n "$dups" ]; then
		echo "FAIL: man/$name: more than one section named: $dups" >&2
		fail=1
	fi
	case $sect in
	1|8) ;;
	*)
		if grep -q '^\.SH[ 	]*"\{0,1\}EXIT STATUS' "$page"; then
			echo "FAIL: man/$name: an EXIT STATUS section in section $sect (it belongs to the program's page)" >&2
			fail=1
		fi ;;
	esac
done
if [ "$n" -eq 0 ]; then
	echo "FAIL: no man pages under $top_srcdir/man" >&2
	exit 1
fi
[ $fail -eq 0 ] && echo "PASS: $n man pages format without warnings"
exit $fail
