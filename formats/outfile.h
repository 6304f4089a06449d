/* SPDX-License-Identifier: MIT */
/*
 * An output file that appears whole or not at all: written under a name of
 * its own (or none) in the target's directory, renamed into place when
 * finished.  What pack's stores and moectl's .npy/.npz outputs are written
 * through.
 *
 * Each writer has a temporary of its own, so two writers of one path never
 * share a file: the last rename wins and the file at the path is always one
 * writer's whole output.  Where the filesystem has O_TMPFILE the temporary
 * has no name until commit, so even SIGKILL leaves nothing behind; elsewhere
 * it is ".NAME.XXXXXXXX", created with O_EXCL, and removed by the signal
 * handler moe_outfile_catch_signals() installs.
 */
#ifndef MOE_OUTFILE_H
#define MOE_OUTFILE_H

#include <limits.h>
#include <stdbool.h>

#include "engine/err.h"

struct moe_outfile {
	int fd;                         /* write here; -1 once committed or aborted */
	int dirfd;                      /* the target's directory */
	char *path;                     /* the final path, as given: for messages */
	const char *base;               /* its last component, inside path */
	bool anonymous;                 /* O_TMPFILE: no name until commit */
	int slot;                       /* signal-cleanup slot, -1 for none */
	char tmp[NAME_MAX + 1];         /* the temporary's name in dirfd, "" for none */
};

/* Create a temporary for @path in its directory.  0, or -errno with a
 * message naming @path. */
int moe_outfile_open(struct moe_outfile *o, const char *path, struct moe_err *err);

/* Rename the finished file into place; with @durable, fsync it before and
 * its directory after (a store is hours of work; a recomputable output may
 * skip the cost).  Ends @o in every case: on failure the temporary is gone
 * and @path untouched. */
int moe_outfile_commit(struct moe_outfile *o, bool durable, struct moe_err *err);

/* Give up: close and remove the temporary.  Safe on an ended @o. */
void moe_outfile_abort(struct moe_outfile *o);

/* Install handlers for SIGINT, SIGTERM and SIGHUP that remove every open
 * temporary and then die of the signal as before (the exit status still
 * says which).  For programs (moectl), not libraries: call once early. */
void moe_outfile_catch_signals(void);

#endif
