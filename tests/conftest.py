import os

import pytest

# No test may reach the hub: loading code that would is exercised on local models/data.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_lm():
    from rqae_pipeline.lm import load_lm

    return load_lm("tiny-random:0", device="cpu")


@pytest.fixture(scope="session")
def gemma_lm():
    """The real offline Gemma-3-270M (converted from the packaged GGUF once, then cached)."""
    from rqae_pipeline.lm import OFFLINE_GEMMA, load_lm

    return load_lm(OFFLINE_GEMMA, device="cpu")
