#!/bin/sh
# SPDX-License-Identifier: MIT
# The moed package with torch tensors: tests/python_client.sh running
# tests/python/test_client_torch.py with a Python that has torch
# ($MOED_TEST_PYTHON); skipped (77) where there is none.
MOED_PY_SUITE=torch
export MOED_PY_SUITE
exec /bin/sh "${top_srcdir:-.}/tests/python_client.sh"
