# SPDX-License-Identifier: MIT
"""moed: the Python client of moed, the daemon that serves the
Mixture-of-Experts layers of LLMs to many local processes.

    import moed
    with moed.Client() as c:                    # $MOED_SOCKET or /run/moed/moed.sock
        y = c.forward(x, c.info.moe_layers[0])  # numpy or torch, float32 or bfloat16

Pure Python over libmoeclient (ctypes); see python/README.md.
"""
from .client import Client, Info, Request, checkpoint_fingerprint
from .errors import (MOE_E_CHECKSUM, MOE_E_LAYER, MOE_E_PROTO, MoedConnectionError, MoedError,
                     MoedTimeoutError)

__version__ = "0.1.0"

__all__ = ["Client", "Info", "Request", "checkpoint_fingerprint", "MoedError",
           "MoedConnectionError", "MoedTimeoutError", "MOE_E_PROTO", "MOE_E_LAYER",
           "MOE_E_CHECKSUM", "__version__"]
