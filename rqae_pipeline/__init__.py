"""rqae_pipeline: activation harvesting, Residual Quantisation Autoencoders and SAE comparison.

Stages talk only through what the previous stage wrote: a Zarr activation store
(`store.py`), then model directories. See README.md for the data flow.
"""

__version__ = "0.1.0"


class RQAEError(Exception):
    """An error the user can cause and fix (bad input, mismatched store, full disk).

    The CLI prints its message as one line and exits non-zero; anything else is a bug
    and keeps its traceback.
    """
