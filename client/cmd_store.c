/* SPDX-License-Identifier: MIT */
#include "config.h"
#include "moectl.h"
int cmd_pack(int argc, char **argv) { (void)argc; (void)argv; return moectl_fail("pack: not built yet"); }
int cmd_inspect(int argc, char **argv) { (void)argc; (void)argv; return moectl_fail("inspect: not built yet"); }
int cmd_verify(int argc, char **argv) { (void)argc; (void)argv; return moectl_fail("verify: not built yet"); }
