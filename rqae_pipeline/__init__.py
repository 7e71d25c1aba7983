"""rqae_pipeline: activation harvesting, Residual Quantisation Autoencoders and SAE comparison.

Stages talk only through what the previous stage wrote: a Zarr activation store
(`store.py`), then model directories. See README.md for the data flow.
"""

import os

# Large CPU tensors (shuffle buffers, decoded batches, the training step's (B, N) products)
# on transparent huge pages: torch's allocator otherwise faults them in 4 KiB at a time, which
# measured 7x slower than numpy's (huge-page) allocation of the same 133 MB here. Read by torch
# at its first large allocation; an explicit setting is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"


class RQAEError(Exception):
    """An error the user can cause and fix (bad input, mismatched store, full disk).

    The CLI prints its message as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """
