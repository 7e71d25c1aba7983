"""`SAEBaseline`: sae-lens SAEs stepped by sae-lens's SAETrainer, saved in sae-lens's format.

No mocks: every architecture of sae-lens's training registry is trained for real, first on
a small synthetic dictionary-learning problem whose activations, like the store's, have a
large mean and norm well above sqrt(d), then through `train()` on a tiny harvested store.
"""

import io
import warnings

import pytest
import torch
from sae_lens import SAE

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.sae import SAEBaseline, parse_sae_arch, sae_architectures
from rqae_pipeline.models.sae_format import load_sae_dir
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, heldout_rows, heldout_split, train

from helpers import tiny_config, untrained_heldout_fvu

D_IN, D_SAE, K, BATCH, STEPS = 64, 128, 8, 256, 60
# The standard SAE's default l1 (5, Anthropic's, for inputs at norm sqrt(d)) is for LM widths
# (checked on the Gemma-3 store, d=640); at d=64 it switches every latent off before any
# of them has learned an atom, so the toy problem uses a weaker one.
TOY_OPTIONS = {"standard": {"l1_coefficient": 1.0}}


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    """(4096, 64): sparse non-negative codes over 256 random directions, plus an offset and noise."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(256, D_IN, generator=g)
    codes = torch.rand(4096, 256, generator=g) * (torch.rand(4096, 256, generator=g) < 0.03)
    return 4 * codes @ atoms + 3 * torch.randn(D_IN, generator=g) + 0.1 * torch.randn(4096, D_IN, generator=g)


def build(arch: str, total_steps: int = 30, **options) -> SAEBaseline:
    spec = ModelSpec(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K, lr=3e-3, options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sae-lens warns about settings it adjusts itself (matching pursuit)
        return SAEBaseline(spec, total_steps=total_steps, batch_size=BATCH)


def batches(x: torch.Tensor, n: int):
    return [x[(i * BATCH) % len(x):][:BATCH] for i in range(n)]


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_every_training_architecture_of_sae_lens_is_offered():
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    assert sae_architectures() == sorted(SAE_TRAINING_CLASS_REGISTRY)
    assert {"standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "matching_pursuit"} <= set(
        sae_architectures())
    for name in ("topk-sae", "topk", "topk_sae"):
        assert parse_sae_arch(name) == "topk"
    assert parse_sae_arch("matryoshka-batchtopk-sae") == parse_sae_arch("matryoshka_batchtopk-sae")
    with pytest.raises(RQAEError, match="available: .*matryoshka_batchtopk-sae"):
        parse_sae_arch("nope-sae")


def test_unknown_or_bad_options_are_clear_errors():
    with pytest.raises(RQAEError, match=r"unknown option.*'nonsense'.*valid: .*\bk\b.*lr_warm_up_steps"):
        build("topk-sae", nonsense=1)
    with pytest.raises(RQAEError, match="unknown option"):
        build("standard-sae", k=4)  # the standard SAE has no k
    with pytest.raises(RQAEError, match="bad options.*strictly increasing"):
        build("matryoshka_batchtopk-sae", matryoshka_widths=[64, 32, 128])


def test_spec_and_options_reach_the_sae_lens_configs():
    m = build("matryoshka_batchtopk-sae", aux_loss_coefficient=0.5, dead_feature_window=7)
    cfg = m.sae.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.k, cfg.aux_loss_coefficient) == (D_IN, D_SAE, K, 0.5)
    assert cfg.matryoshka_widths[-1] == D_SAE and cfg.matryoshka_widths == sorted(set(cfg.matryoshka_widths))
    assert m.trainer.cfg.dead_feature_window == 7 and m.trainer.cfg.lr == 3e-3
    assert m.trainer.cfg.total_training_steps == 30


def test_construction_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b = build("topk-sae"), build("topk-sae")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.sae.W_enc, b.sae.W_enc)
    other = SAEBaseline(ModelSpec(arch="topk-sae", d_in=D_IN, d_sae=D_SAE, k=K), total_steps=30, seed=1)
    assert not torch.equal(a.sae.W_enc, other.sae.W_enc)


@pytest.mark.parametrize("arch", sae_architectures())
def test_each_architecture_trains_and_reloads_with_sae_lens(data, tmp_path, arch):
    # the dead-latent window outlasts the run here (the project scales it to a twentieth of a run,
    # 3 steps at this length), so a latent that stays silent is not yet "dead" by sae-lens's rule
    options = {"dead_feature_window": STEPS + 1, **TOY_OPTIONS.get(arch, {})}
    m = build(f"{arch}-sae", total_steps=STEPS, **options)
    m.init_from_data(data[:1024])
    held = data[-512:]
    fvu0 = fvu(held, m.reconstruct(held))
    stats = [m.train_step(b) for b in batches(data[:-512], STEPS)]
    # 0-d device tensors: the loop reads them (a host sync) only when it logs
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in stats[-1].values())
    assert {"loss", "fvu", "l0", "dead"} <= set(stats[-1])
    assert sum(s["loss"] for s in stats[-5:]) < sum(s["loss"] for s in stats[:5])
    # JumpReLU improves least: it first spends ~20 steps pulling L0 down to k
    assert fvu(held, m.reconstruct(held)) < fvu0 - 0.05
    assert m.trainer.n_training_steps == STEPS and m.trainer.n_training_samples == STEPS * BATCH
    health = m.health(held)
    # sae-lens calls a latent dead after dead_feature_window steps without firing: none is
    # before the window has passed (test_latents_that_stop_firing_are_counted_dead covers after)
    assert 0 < health["l0"] <= D_SAE and health["dead"] == 0

    m.save(tmp_path)
    loaded = SAE.load_from_disk(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(held), m.reconstruct(held), rtol=1e-6, atol=1e-6)
    assert m.weight_bytes() == (tmp_path / "sae_weights.safetensors").stat().st_size - _header_bytes(tmp_path)
    # saving is not the end of training: it works on a copy
    m.train_step(data[:BATCH])


def _header_bytes(d) -> int:
    raw = (d / "sae_weights.safetensors").read_bytes()
    return 8 + int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("norm", ["none", "layer_norm", "covariance_whitening"])
def test_other_input_normalisations_are_folded_into_the_saved_sae(data, tmp_path, norm):
    m = build("topk-sae", total_steps=20, normalize_activations=norm)
    m.init_from_data(data[:1024])
    held = data[-512:]
    fvu0 = fvu(held, m.reconstruct(held))
    for b in batches(data[:-512], 20):
        m.train_step(b)
    assert fvu(held, m.reconstruct(held)) < fvu0 - 0.05
    m.save(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(SAE.load_from_disk(str(tmp_path))(held), m.reconstruct(held), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, extra", [("topk-sae", {}), ("matryoshka_batchtopk-sae", {}),
                                         ("standard-sae", {"l1_warm_up_steps": 10}),
                                         ("topk-sae", {"normalize_activations": "covariance_whitening"})])
def test_resuming_from_a_checkpoint_continues_bit_exactly(data, arch, extra):
    # small windows, warm-ups and a decay so that the sparsity-window reset, the dead-latent
    # mask, the lr schedule and (standard) the l1 coefficient's warm-up all cross the checkpoint
    opts = {"feature_sampling_window": 4, "dead_feature_window": 3, "lr_warm_up_steps": 3, "lr_decay_steps": 4,
            **extra}
    xs = batches(data, 12)
    ref = build(arch, total_steps=12, **opts)
    ref.init_from_data(data[:1024])
    for i, x in enumerate(xs):
        if i == 6:
            snap = ref.checkpoint_state()  # kept in memory while `ref` trains on: must be a snapshot
        ref.train_step(x)
    buf = io.BytesIO()
    torch.save(snap, buf)  # as train.py writes it
    buf.seek(0)
    # the same snapshot twice: loading must not hand its tensors to the optimizer either
    for state in (snap, snap, torch.load(buf, weights_only=True)):
        resumed = build(arch, total_steps=12, **opts)
        resumed.load_checkpoint_state(state)
        for x in xs[6:]:
            resumed.train_step(x)
        a, b = ref.checkpoint_state(), resumed.checkpoint_state()
        for name, t in a["sae"].items():
            assert torch.equal(t, b["sae"][name]), name
        for key in ("n_training_steps", "n_training_samples", "n_frac_active_samples", "scaling_factor"):
            assert a[key] == b[key], key
        assert torch.equal(a["act_freq_scores"], b["act_freq_scores"])
        assert torch.equal(a["n_forward_passes_since_fired"], b["n_forward_passes_since_fired"])
        assert ref.trainer.optimizer.param_groups[0]["lr"] == resumed.trainer.optimizer.param_groups[0]["lr"]
        assert torch.equal(ref.reconstruct(data[:64]), resumed.reconstruct(data[:64]))


def test_latents_that_stop_firing_are_counted_dead(data):
    window = 3
    m = build("topk-sae", total_steps=10, dead_feature_window=window)
    m.init_from_data(data[:1024])
    silenced = 16
    with torch.no_grad():
        m.sae.b_enc[:silenced] = -1e4  # never among the top k again (Adam moves b_enc by ~lr a step)
    xs = batches(data, window + 1)
    for x in xs[:window]:
        m.train_step(x)
    assert m.health(data[-512:])["dead"] == 0  # silent for `window` steps is not yet dead
    m.train_step(xs[window])
    dead = m.health(data[-512:])["dead"]
    # the silenced latents, plus at most a few that no batch happened to fire
    assert silenced <= dead <= silenced + D_SAE // 8, dead


# ---------------------------------------------------------------- through train() on a store


@pytest.fixture(scope="module")
def store_path(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "tiny.zarr"
    harvest(tiny_config(out, tokens=8192), lm=tiny_lm, progress=False)
    return out


def sae_cfg(store_path, out, arch, steps=30, **kw):
    return TrainConfig(store=store_path, out=out, model=ModelSpec(arch=arch, d_in=64, d_sae=128, k=8, lr=1e-3, **kw),
                       batch_size=256, tokens=256 * steps, eval_every=1000)


@pytest.mark.parametrize("arch", sae_architectures())
def test_each_architecture_learns_through_train_and_its_saved_sae_reads_the_store(store_path, tmp_path, arch):
    # JumpReLU's quadratic L0 penalty first pulls L0 towards its target, so it needs longer
    cfg = sae_cfg(store_path, tmp_path / arch, f"{arch}-sae", steps=80 if arch == "jumprelu" else 30,
                  options=TOY_OPTIONS.get(arch, {}))
    result = train(cfg, progress=False)
    # measured (sae-lens 6.50): every architecture's held-out FVU falls by 0.13 (matching
    # pursuit, which starts at 0.60) to 0.34 from its untrained value (~1.03) in these steps
    assert result.heldout["fvu"] < untrained_heldout_fvu(cfg) - 0.08
    sae = load_sae_dir(tmp_path / arch)  # as the pipeline reads it: in the stored space (models/sae_format.py)
    store = ActivationStore.open(store_path)
    x = heldout_rows(store, cfg, heldout_split(store, cfg.heldout_fraction))
    with torch.no_grad():
        err = (sae(x) - x).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    # the saved SAE, back in the stored space, reads store activations directly (activation
    # scale folded in) and reproduces the held-out FVU measured before saving
    assert float(err) == pytest.approx(result.heldout["fvu"], rel=1e-3, abs=1e-4)


def test_sae_training_resumes_to_the_same_weights(store_path, tmp_path):
    from safetensors.torch import load_file

    import rqae_pipeline.train as T

    ref = tmp_path / "ref"
    train(sae_cfg(store_path, ref, "matryoshka_batchtopk-sae"), progress=False)
    out = tmp_path / "resumed"
    half = TrainConfig(**{**sae_cfg(store_path, out, "matryoshka_batchtopk-sae").__dict__, "checkpoint_every": 10})
    # a run stopped at step 15 (its checkpoint is step 10), then resumed
    steps = {"n": 0}
    orig = T.build_trainable

    def stopping(*a, **k):
        trainable = orig(*a, **k)
        step = trainable.train_step

        def counted(x, **kw):
            steps["n"] += 1
            if steps["n"] == 15:
                raise KeyboardInterrupt
            return step(x, **kw)

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


def test_unknown_option_through_train_is_a_clear_error_and_writes_nothing(store_path, tmp_path):
    with pytest.raises(RQAEError, match="unknown option.*valid: .*k"):
        train(sae_cfg(store_path, tmp_path / "x", "topk-sae", options={"nonsense": 1}), progress=False)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
