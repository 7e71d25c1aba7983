"""End to end on the real offline Gemma-3-270M: the packaged GGUF, converted once and cached."""

import numpy as np
import pytest
import torch

from rqae_pipeline.harvest import HarvestConfig, harvest
from rqae_pipeline.lm import OFFLINE_GEMMA, resolve_hook
from rqae_pipeline.store import ActivationStore, Flags
from rqae_pipeline.summary import storage_fvu, summarise

pytestmark = pytest.mark.slow


def test_offline_model_is_gemma_3_270m(gemma_lm):
    cfg = gemma_lm.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (18, 640, 262144)
    assert resolve_hook(gemma_lm, 9).name == "blocks.9.hook_resid_post"
    tok = gemma_lm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = gemma_lm.model(ids)
    top5 = [tok.decode(i) for i in logits[0, -1].topk(5).indices]
    assert " Paris" in top5  # a real language model (HF's own forward gives the same top 5)
    text = tok("Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.",
               return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = gemma_lm.model(text, return_type="loss")
    assert loss < 4.0  # uniform over the 262k vocabulary would be 12.5 nats


def test_weights_are_laid_out_as_the_forward_reads_them(gemma_lm):
    """load_lm stores Gemma's GatedMLP and grouped-query attention weights so the forward's
    transposes are views (no copy per call), and the forward is TransformerLens's own, bit for bit."""
    import einops

    from rqae_pipeline.lm import store_weights_as_read

    model = gemma_lm.model
    for block in model.blocks:
        mlp, attn = block.mlp, block.attn
        assert all(w.T.contiguous().data_ptr() == w.data_ptr() for w in (mlp.W_in, mlp.W_gate, mlp.W_out))
        assert all(einops.rearrange(w, "h m k -> (h k) m").data_ptr() == w.data_ptr()
                   for w in (attn.W_Q, attn._W_K, attn._W_V))
        assert einops.rearrange(attn.W_O, "h k m -> m (h k)").contiguous().data_ptr() == attn.W_O.data_ptr()
    ids = gemma_lm.tokenizer("Water boils at one hundred degrees.", return_tensors="pt").input_ids
    with torch.inference_mode():
        ours = model(ids)
        try:
            for p in model.parameters():
                p.data = p.data.contiguous()  # TransformerLens's own layout
            theirs = model(ids)
        finally:
            store_weights_as_read(model)
    assert torch.equal(ours, theirs)


def test_harvest_real_activations(gemma_lm, tmp_path):
    out = tmp_path / "gemma.zarr"
    cfg = HarvestConfig(out=out, model=OFFLINE_GEMMA, tokens=1024, batch_contexts=4, contexts_per_shard=8,
                        contexts_per_chunk=4)
    result = harvest(cfg, lm=gemma_lm, progress=False)
    store = ActivationStore.open(out)
    assert result.tokens == store.n_tokens == 1024 and store.spec.hook == "blocks.9.hook_resid_post"
    rows = store.read()
    tokens = torch.from_numpy(rows.tokens.reshape(-1, 128).astype(np.int64))
    with torch.inference_mode():
        _, cache = gemma_lm.model.run_with_cache(tokens[:2], names_filter=[store.spec.hook], stop_at_layer=10)
        raw = cache[store.spec.hook].reshape(-1, 640)
        normed = gemma_lm.model.ln_final(raw)
    torch.testing.assert_close(rows.acts[:256], normed, rtol=3e-3, atol=3e-2)
    torch.testing.assert_close(store.raw(store.read(0, 256)), raw, rtol=3e-3, atol=3e-1)
    # BOS is an attention sink in Gemma: flagged as BOS and as a norm outlier.
    bos = (rows.flags & Flags.BOS) != 0
    assert bos.sum() == 8 and ((rows.flags[bos] & Flags.OUTLIER) != 0).all()
    assert storage_fvu(store.manifest) < 1e-5
    s = summarise(store)
    assert 0.3 < s["ratio_to_fp32_cache"] < 0.6 and s["sample"]["finite"]


def test_rqae_prefixes_are_reconstructions_on_real_activations(gemma_lm, tmp_path):
    """Held-out FVU must fall steadily with the number of layers used (blog Fig 2b reads a
    model stopped early; a feature is a prefix of the codes)."""
    from rqae_pipeline.models.base import ModelSpec
    from rqae_pipeline.train import TrainConfig, train

    store = tmp_path / "gemma.zarr"
    harvest(HarvestConfig(out=store, model=OFFLINE_GEMMA, tokens=8192, batch_contexts=8, contexts_per_shard=16),
            lm=gemma_lm, progress=False)
    cfg = TrainConfig(store=store, out=tmp_path / "rqae", model=ModelSpec(arch="rqae", d_in=640, n_q=16),
                      batch_size=256, tokens=256 * 80, heldout_fraction=0.1)
    curve = train(cfg, progress=False).heldout["fvu_by_prefix"]
    values = [curve[m] for m in ("1", "2", "4", "8", "16")]
    assert all(a > b for a, b in zip(values, values[1:])), curve
    assert values[0] < 1.0 and values[-1] < 0.6, curve
