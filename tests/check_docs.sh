#!/bin/sh
# SPDX-License-Identifier: MIT
#
# Every citation of the design document resolves.  Sources, man pages, the
# README and the document itself cite it by section: "ARCHITECTURE.md 4.1",
# "ARCHITECTURE.md section 5", "docs/ARCHITECTURE.md, sections 4.1 and
# 4.1a", "section 4.1 of ARCHITECTURE.md", "ARCHITECTURE 5", "§5".  This
# test finds them (across line breaks, through comment leaders, roff and
# markdown markup) and fails, naming file and line, when
#
#   - docs/ARCHITECTURE.md has no heading with the cited number
#     ("## 5. Rules", "### 4.1a Released formats"), or two headings have
#     one number;
#   - a citation names the document by another path or spelling
#     ("shared/ARCHITECTURE.md", "../ARCHITECTURE.md", "architecture.md"):
#     it is docs/ARCHITECTURE.md, cited as that or as plain ARCHITECTURE.md;
#   - a line says the document is kept outside the repository;
#   - inside docs/ARCHITECTURE.md, "section N" names no heading.
#
# Needs only $top_srcdir (make check sets it; by hand:
# top_srcdir=. sh tests/check_docs.sh).  Exit 0 pass, 1 fail.

set -u
: "${top_srcdir:=.}"
LC_ALL=C
export LC_ALL

doc="$top_srcdir/docs/ARCHITECTURE.md"
if [ ! -f "$doc" ]; then
	echo "FAIL: $doc is missing: it is the design document that the sources cite" >&2
	exit 1
fi

# The numbered headings: "## 4. External contracts" -> 4, "### 4.1a ..." -> 4.1a.
heads=$(sed -n 's/^##*[ 	][ 	]*\([0-9][0-9]*\(\.[0-9][0-9]*\)*[a-z]\{0,1\}\)\.\{0,1\}[ 	].*/\1/p' "$doc")
if [ -z "$heads" ]; then
	echo "FAIL: docs/ARCHITECTURE.md has no numbered headings" >&2
	exit 1
fi
dups=$(printf '%s\n' "$heads" | sort | uniq -d)
if [ -n "$dups" ]; then
	echo "FAIL: docs/ARCHITECTURE.md numbers more than one heading" $dups >&2
	exit 1
fi

# The files that may cite it: text sources, build files, scripts, man pages,
# documentation.  Build trees, VCS data, Python packages installed in the
# tree (bootstrap.sh's build/venv holds torch and transformers) and this
# test (whose comments show the forms) are left out.
list=$(mktemp "${TMPDIR:-/tmp}/moe-docs.XXXXXX") || exit 1
trap 'rm -f "$list"' EXIT
trap 'exit 1' INT TERM HUP
(cd "$top_srcdir" && find . \
	\( -name .git -o -name .libs -o -name .deps -o -name autom4te.cache \
	   -o -name _build -o -name _inst -o -name node_modules \
	   -o -name site-packages -o -name __pycache__ \) -prune -o \
	-type f \( -name '*.[ch]' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \
	   -o -name '*.sh' -o -name '*.am' -o -name '*.ac' -o -name '*.m4' -o -name '*.in' \
	   -o -name '*.md' -o -name '*.txt' -o -name '*.map' -o -name '*.conf' \
	   -o -name '*.[1-8]' -o -name '*.service' -o -name '*.socket' \
	   -o -path './bench/run*' -o -path './tools/*' -o -path './.ci/*' \) \
	! -path ./tests/check_docs.sh -print) | sort >"$list"

# Files in the list whose text mentions the document at all.
files=$(cd "$top_srcdir" && while IFS= read -r f; do
	if grep -qi 'architecture' "$f" 2>/dev/null; then printf '%s\n' "$f"; fi
done <"$list")
n_files=$(wc -l <"$list")

out=$(cd "$top_srcdir" && printf '%s\n' $files | sed 's|^\./||' | {
	set --
	while IFS= read -r f; do set -- "$@" "$f"; done
	[ $# -eq 0 ] && exit 0
	awk -v heads="$heads" -v Q="'" '
	BEGIN {
		n = split(heads, h, "\n")
		for (i = 1; i <= n; i++)
			have[h[i]] = 1
		NUM = "[0-9]+(\\.[0-9]+)*[a-z]?"
		SEC = "(sections?|Sections?|sec\\.|\302\247)"
		nfail = 0
		ncite = 0
	}

	# One line as plain text: no comment leaders, roff or markdown markup.
	function clean(s) {
		gsub(/\t/, " ", s)
		sub(/^\.\\"/, "", s)                        # roff comment
		sub(/^\.[A-Za-z][A-Za-z]*[ ]*/, "", s)      # roff macro (.B, .BR, .SH)
		gsub(/\\f[BIRP]/, "", s)
		gsub(/\\f\([A-Za-z][A-Za-z]/, "", s)
		gsub(/\\f\[[A-Za-z]*\]/, "", s)
		gsub(/\\\(sc/, "\302\247", s)
		gsub(/\\\[sc\]/, "\302\247", s)
		gsub(/\\-/, "-", s)
		gsub(/\\&/, "", s)
		gsub(/\\[ ~]/, " ", s)
		gsub(/\\\((em|en)/, " ", s)
		sub(/^[ ]*(\/\/|\/\*|\*\/|\*|#|--|;|dnl[ ])*/, "", s)  # comment leaders
		gsub(/\/\*|\*\//, " ", s)
		gsub(/[`*]/, "", s)
		gsub(/  +/, " ", s)
		sub(/^ /, "", s)
		sub(/ $/, "", s)
		return s
	}

	function fail(msg) {
		printf "FAIL: %s:%d: %s\n", file, lineno, msg
		nfail++
	}

	function cite(num, form) {
		sub(/\.$/, "", num)
		ncite++
		if (!(num in have))
			fail("cites " form " section " num ", but docs/ARCHITECTURE.md has no heading numbered " num)
	}

	# The section numbers at the start of r (after the name), cited as form.
	function numbers_after(r, form,    got) {
		got = 0
		sub("^" Q "s", "", r)
		sub(/^ ?[,:;(]? ?/, "", r)
		if (match(r, "^" SEC " ?")) r = substr(r, RLENGTH + 1)
		while (match(r, "^" NUM)) {
			if (substr(r, RLENGTH + 1, 1) ~ /[A-Za-z0-9]/)
				break
			cite(substr(r, 1, RLENGTH), form)
			got++
			r = substr(r, RLENGTH + 1)
			if (!match(r, "^ ?(,|and|or|&|to|-) ?(" SEC " ?)?[0-9]"))
				break
			r = substr(r, RLENGTH)
		}
		return got
	}

	# "section 4.1 of [the] ARCHITECTURE.md": the numbers before the name.
	function numbers_before(b, form,    got, m) {
		got = 0
		if (!match(b, SEC " ?" NUM "(( ?, ?| and | or | to )" NUM ")* (of|in) (the )?$"))
			return 0
		m = substr(b, RSTART, RLENGTH)
		sub("^" SEC, "", m)
		while (match(m, NUM)) {
			cite(substr(m, RSTART, RLENGTH), form)
			got++
			m = substr(m, RSTART + RLENGTH)
		}
		return got
	}

	function scan(P, C, N,    text, up, from, cend, q, s, pre, orig, after, ext, rest, form, got) {
		text = P " " C " " N
		up = toupper(text)
		from = length(P) + 2
		cend = from + length(C) - 1
		while ((q = index(substr(up, from), "ARCHITECTURE")) > 0) {
			q += from - 1
			from = q + 12
			if (q > cend)
				break
			# the path in front of the name
			s = q
			while (s > 1 && substr(text, s - 1, 1) ~ /[A-Za-z0-9_.~\/-]/)
				s--
			pre = substr(text, s, q - s)
			if (pre != "" && pre !~ /\/$/)
				continue                # an identifier: MOE_ARCHITECTURE, Architectures
			orig = substr(text, q, 12)
			after = substr(text, q + 12)
			ext = ""
			if (match(after, /^\.[A-Za-z]+/)) {
				ext = substr(after, 1, RLENGTH)
				after = substr(after, RLENGTH + 1)
			}
			if (orig != "ARCHITECTURE" && ext == "" && pre == "")
				continue                # the word "architecture" in prose
			form = pre orig ext
			if (orig != "ARCHITECTURE" || (ext != "" && ext != ".md")) {
				fail("\"" form "\": the design document is docs/ARCHITECTURE.md")
				continue
			}
			if (pre != "" && pre != "docs/" && pre != "./docs/" &&
			    !(pre == "/docs/" && s > 1 && substr(text, s - 1, 1) ~ /[)}]/)) {
				fail("\"" form "\": the design document is docs/ARCHITECTURE.md, not " form)
				continue
			}
			if (substr(after, 1, 160) ~ /(rather than|not|outside) (in )?(this|the) repository|shared notes/)
				fail("\"" form "\" is said to be outside the repository: it is docs/ARCHITECTURE.md")
			got = numbers_after(after, form)
			got += numbers_before(substr(text, 1, s - 1), form)
		}
	}

	# Inside the document: "section N", "sections N and M", "§N".
	function scan_self(C,    r, m) {
		r = C
		while (match(r, SEC " ?" NUM "(( ?, ?| and | or | to )" NUM ")*")) {
			m = substr(r, RSTART, RLENGTH)
			r = substr(r, RSTART + RLENGTH)
			if (r ~ /^[A-Za-z0-9]/)
				continue
			sub("^" SEC, "", m)
			while (match(m, NUM)) {
				cite(substr(m, RSTART, RLENGTH), "docs/ARCHITECTURE.md")
				m = substr(m, RSTART + RLENGTH)
			}
		}
	}

	function flush() {
		if (cur_set) {
			scan(prev, cur, nxt)
			if (file == "docs/ARCHITECTURE.md")
				scan_self(cur)
		}
	}

	FNR == 1 && NR > 1 {
		# the last line of the previous file
		nxt = ""; lineno = lastno
		flush()
		prev = ""; cur = ""; cur_set = 0
	}
	{
		line = clean($0)
		if (FNR == 1) {
			file = FILENAME
			cur = line; cur_set = 1; prev = ""; lastno = 1
			next
		}
		nxt = line
		lineno = FNR - 1
		flush()
		prev = cur; cur = nxt; lastno = FNR
	}
	END {
		if (NR > 0) {
			nxt = ""; lineno = lastno
			flush()
		}
		printf "CITATIONS: %d\n", ncite
		exit nfail > 0
	}
	' "$@"
})
rc=$?

printf '%s\n' "$out" | grep '^FAIL' >&2
if [ "$rc" -ne 0 ] || printf '%s\n' "$out" | grep -q '^FAIL'; then
	exit 1
fi
cites=$(printf '%s\n' "$out" | sed -n 's/^CITATIONS: //p')
echo "PASS: ${cites:-0} section citations in $n_files files resolve in docs/ARCHITECTURE.md"
exit 0
