# SPDX-License-Identifier: MIT
"""The ctypes mirrors of python/moed/_lib.py against the compiler's layout
of <moeclient.h> (printed by tests/python_layout, a check program built
from the header): any drift in size, offset or a copied constant fails.

Environment: MOED_TEST_LAYOUT, the file holding python_layout's output.
"""
import ctypes
import os
import unittest

from moed import _lib, errors

STRUCTS = {
    "moe_client_options": _lib.ClientOptions,
    "moe_model_info": _lib.ModelInfo,
    "moe_request": _lib.Request,
    "moe_completion": _lib.Completion,
}

CONSTANTS = {
    "MOE_F32": _lib.MOE_F32,
    "MOE_BF16": _lib.MOE_BF16,
    "MOE_E_PROTO": errors.MOE_E_PROTO,
    "MOE_E_LAYER": errors.MOE_E_LAYER,
    "MOE_E_CHECKSUM": errors.MOE_E_CHECKSUM,
    "MOE_DEFAULT_SOCKET": _lib.MOE_DEFAULT_SOCKET,
    "MOE_FINGERPRINT_LEN": _lib.MOE_FINGERPRINT_LEN,
}


def read_layout(path):
    sizes, fields, consts = {}, {}, {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts[0] == "const":
                consts[parts[1]] = parts[2]
            elif parts[1] == "size":
                sizes[parts[0]] = int(parts[2])
            else:
                s, name = parts[0].split(".")
                fields.setdefault(s, {})[name] = (int(parts[1]), int(parts[2]))
    return sizes, fields, consts


class LayoutTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sizes, cls.fields, cls.consts = read_layout(os.environ["MOED_TEST_LAYOUT"])

    def test_every_struct_is_mirrored(self):
        self.assertEqual(set(self.sizes), set(STRUCTS))

    def test_sizes(self):
        for name, cls in STRUCTS.items():
            self.assertEqual(ctypes.sizeof(cls), self.sizes[name],
                             f"sizeof(struct {name}) is {self.sizes[name]} in C, "
                             f"{ctypes.sizeof(cls)} in moed/_lib.py")

    def test_fields(self):
        for name, cls in STRUCTS.items():
            mine = {f[0]: (getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_}
            self.assertEqual(mine, self.fields[name],
                             f"struct {name}: offsets and sizes (C) != moed/_lib.py")

    def test_constants(self):
        for name, value in self.consts.items():
            self.assertEqual(str(CONSTANTS[name]), value, f"{name} differs from <moeclient.h>")


if __name__ == "__main__":
    unittest.main()
