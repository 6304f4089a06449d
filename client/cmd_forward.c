/* SPDX-License-Identifier: MIT */
#include "config.h"
#include "moectl.h"
int cmd_forward(int argc, char **argv) { (void)argc; (void)argv; return moectl_fail("forward: not built yet"); }
