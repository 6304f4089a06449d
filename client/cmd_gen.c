/* SPDX-License-Identifier: MIT */
#include "config.h"
#include "moectl.h"
int cmd_gen_model(int argc, char **argv) { (void)argc; (void)argv; return moectl_fail("gen-model: not built yet"); }
