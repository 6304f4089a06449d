#!/bin/sh
# SPDX-License-Identifier: MIT
# The layout's rule, checked: dependencies point down, and moed links nothing
# it does not run (docs/ARCHITECTURE.md section 3.1).
#
# Each component may include only the components listed for it below (its
# own folder always); a quoted include of another component names its folder
# ("engine/store.h"), so the includes are the dependency graph.  Then the
# moed binary must hold no symbol of the offline formats (libmoeformats).
set -u
src=${top_srcdir:-.}
bld=${top_builddir:-.}
bad=0

# component: the components it may include
allowed() {
	case $1 in
	engine) echo "engine" ;;
	formats) echo "engine formats" ;;
	proto) echo "proto libmoeclient" ;;      # the public header's enums
	libmoeclient) echo "libmoeclient proto" ;;
	daemon) echo "daemon engine proto libmoeclient" ;;
	gpu) echo "gpu engine" ;;
	client) echo "client engine formats libmoeclient" ;;
	*) echo "*" ;;                        # tests, bench: anything
	esac
}

for dir in engine formats proto libmoeclient daemon gpu client; do
	ok=$(allowed "$dir")
	for f in "$src/$dir"/*.c "$src/$dir"/*.h "$src/$dir"/*.cu "$src/$dir"/*.cuh; do
		[ -f "$f" ] || continue
		# quoted includes of another component: "folder/name.h"
		grep -n '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[a-z_]*/' "$f" |
		while IFS= read -r line; do
			n=${line%%:*}
			inc=$(printf '%s\n' "$line" | sed 's/.*include[[:space:]]*"\([a-z_]*\)\/.*/\1/')
			case " $ok " in
			*" $inc "*) ;;
			*) echo "FAIL: ${f#"$src"/}:$n includes $inc/, but $dir may depend only on: $ok" >&2
			   echo x ;;
			esac
		done
	done
done >"${TMPDIR:-/tmp}/layering.$$" 
if [ -s "${TMPDIR:-/tmp}/layering.$$" ]; then
	bad=1
fi
rm -f "${TMPDIR:-/tmp}/layering.$$"

# the public example includes the installed header alone
if grep -n '#[[:space:]]*include[[:space:]]*"' "$src/examples/moe_forward_example.c"; then
	echo "FAIL: examples/moe_forward_example.c must include <moeclient.h> and system headers only" >&2
	bad=1
fi

# moed links nothing it does not run: no symbol of libmoeformats in it
moed=${MOED:-$bld/daemon/moed}
if [ -x "$moed" ] && command -v nm >/dev/null 2>&1; then
	# the real binary, not libtool's wrapper script
	[ -x "$bld/daemon/.libs/moed" ] && moed=$bld/daemon/.libs/moed
	syms=$(nm "$moed" 2>/dev/null | awk '$2 ~ /^[TtDdBbRr]$/ { print $3 }' |
	       grep -E '^(moe_st_|moe_hf_|moe_gen_|gen_|moe_pack|moe_npy_|moe_npz_|moe_store_writer_)' || true)
	if [ -n "$syms" ]; then
		echo "FAIL: moed links code of the offline formats it never runs:" >&2
		echo "$syms" | head -5 >&2
		bad=1
	fi
	if ! nm "$moed" 2>/dev/null | grep -q ' moe_engine_forward$'; then
		echo "FAIL: nm finds no moe_engine_forward in $moed: is it stripped? the check above proves nothing" >&2
		bad=1
	fi
else
	echo "note: no moed binary or nm; the link check is skipped" >&2
fi
exit $bad
