"""sae-lens SAEs trained by sae-lens's SAETrainer from our loop, saved in sae-lens's format."""

import pytest
import torch
from sae_lens import SAE

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.sae import parse_sae_arch, sae_architectures
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, heldout_rows, heldout_split, train

from helpers import tiny_config


@pytest.fixture(scope="module")
def store_path(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "tiny.zarr"
    harvest(tiny_config(out, tokens=8192), lm=tiny_lm, progress=False)
    return out


def sae_cfg(store_path, out, arch, steps=30, **kw):
    return TrainConfig(store=store_path, out=out, model=ModelSpec(arch=arch, d_in=64, d_sae=128, k=8, lr=1e-3, **kw),
                       batch_size=256, tokens=256 * steps, eval_every=1000)


def test_every_training_architecture_of_sae_lens_is_offered():
    archs = sae_architectures()
    assert {"standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "matching_pursuit"} <= set(archs)
    assert parse_sae_arch("topk-sae") == "topk" and parse_sae_arch("matryoshka-batchtopk-sae") == "matryoshka_batchtopk"
    with pytest.raises(RQAEError, match="available: .*topk-sae"):
        parse_sae_arch("nope-sae")


@pytest.mark.parametrize("arch", sae_architectures())
def test_each_architecture_trains_and_reloads_with_sae_lens(store_path, tmp_path, arch):
    # JumpReLU's quadratic L0 penalty first pulls L0 towards its target, so it needs longer
    cfg = sae_cfg(store_path, tmp_path / arch, f"{arch}-sae", steps=80 if arch == "jumprelu" else 30)
    result = train(cfg, progress=False)
    assert result.heldout["fvu"] < 1.0
    sae = SAE.load_from_disk(str(tmp_path / arch))
    store = ActivationStore.open(store_path)
    x = heldout_rows(store, cfg, heldout_split(store, cfg.heldout_fraction))
    with torch.no_grad():
        err = (sae(x) - x).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    # the saved SAE reads store activations directly (activation scale folded in) and
    # reproduces the held-out FVU measured before saving
    assert float(err) == pytest.approx(result.heldout["fvu"], rel=1e-3, abs=1e-4)


def test_sae_training_resumes_to_the_same_weights(store_path, tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    train(sae_cfg(store_path, ref, "matryoshka_batchtopk-sae"), progress=False)
    out = tmp_path / "resumed"
    half = TrainConfig(**{**sae_cfg(store_path, out, "matryoshka_batchtopk-sae").__dict__, "checkpoint_every": 10})
    # a run stopped at step 15 (its checkpoint is step 10), then resumed
    import rqae_pipeline.train as T

    steps = {"n": 0}
    orig = T.build_trainable

    def stopping(*a, **k):
        trainable = orig(*a, **k)
        step = trainable.train_step

        def counted(x):
            steps["n"] += 1
            if steps["n"] == 15:
                raise KeyboardInterrupt
            return step(x)

        trainable.train_step = counted
        return trainable

    T.build_trainable = stopping
    try:
        assert train(half, progress=False).interrupted
    finally:
        T.build_trainable = orig
    train(TrainConfig(**{**half.__dict__, "resume": True}), progress=False)
    a, b = load_file(ref / "sae_weights.safetensors"), load_file(out / "sae_weights.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_option_is_a_clear_error(store_path, tmp_path):
    with pytest.raises(RQAEError, match="unknown option.*valid: .*k"):
        train(sae_cfg(store_path, tmp_path / "x", "topk-sae", options={"nonsense": 1}), progress=False)
