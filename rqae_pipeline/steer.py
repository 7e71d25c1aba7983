"""Steering generation with RQAE vMF features, and Codebook Features-style code activation.

RQAE (blog, "Activation Steering" and "Steering"; seeds/003-rqae-blog.txt). For every
hidden state at the store's hook during generation:

1. normalise it as the store did (final-norm gain or pure RMS) and encode it: codes c_i;
2. on the k layers with the largest vMF concentration kappa_i ("top_k"), turn the unit
   code u_i = C[c_i] toward the feature's mean direction mu_i with the strength-scaled
   concentration kappa_i' = kappa_i * s / (1 - s):

       q_i = (kappa_ref u_i + kappa_i' mu_i) / |kappa_ref u_i + kappa_i' mu_i|

   This is the posterior mode of a direction observed as u_i under a vMF(mu_i, kappa_i')
   prior, the observation counted with the feature's median concentration kappa_ref: a
   layer with a low "standard deviation" 1/kappa_i pulls harder than the feature's typical
   layer, and a code already near mu_i moves less. (With a unit observation weight, the
   fitted kappas of a few similar tokens, 20-200, would snap every steered layer to its
   mean at any strength above ~0.05: the dial would do nothing.) The multiplier s / (1 - s) is
   exp(logit(s)), an exponential scaling with the blog's three anchors: s = 0 makes
   every distribution uniform (no pull, the generation is unchanged), s = 0.5 keeps the
   fitted distribution, s = 1 makes it a point mass (q_i = mu_i). The blog's own code was
   never released, so the exact curve is ours.
3. decode: the change of the reconstruction, sum_i (q_i - u_i) W_out[i], mapped back to
   raw space with the token's own scale and the store's gain, is added to the raw
   activation ("delta" splice). The part of the activation the RQAE does not reconstruct
   is kept, so strength 0 is exactly the unsteered model. "replace" splices the steered
   reconstruction itself (the error is dropped), as the CE-delta evaluation does.

The BOS position is never steered (every BOS has the same activation; the store leaves it
out of features too).

Codebook Features (Tamkin et al. 2023, seeds/000-002): the paper steers by activating a
chosen code at every position. Here the bottleneck is an autoencoder on stored
activations: the chosen code replaces the weakest of the k active codes (the bottleneck
keeps k codes on), and the change of the reconstruction is spliced in the same way.

The topic-steering measure is the Codebook Features paper's: the share of generations
that contain a word of the concept (here: the feature's top-example tokens, or a given
word list), with and without steering, from the same prompts and sampling seed
(`generation.py`). Each architecture steers through its strategy (`RQAESteering`,
`CodebookSteering`), chosen once from the model directory; `run_steering` is the same for both.
The feature to steer toward is loaded by `steer_features`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.feature_checks import check_model_store
from rqae_pipeline.features import KAPPA_MAX, VMF
from rqae_pipeline.generation import (
    GenerationConfig,
    concept_frequency,
    decode_continuation,
    generate,
)
from rqae_pipeline.steer_features import (
    SteerFeature,
    load_feature,
    query_feature,
)

Splice = Literal["delta", "replace"]


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True, kw_only=True)
class SteerConfig:
    strength: float = 0.8  # in [0, 1]
    top_k_layers: int = 8  # RQAE layers steered: those with the largest kappa
    splice: Splice = "delta"

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
        if self.top_k_layers < 1:
            raise ValueError(f"--top-k-layers must be positive, got {self.top_k_layers}")
        if self.splice not in ("delta", "replace"):
            raise ValueError(f"unknown splice {self.splice!r}; use 'delta' or 'replace'")


@dataclass(frozen=True, kw_only=True)
class SteerRunConfig:
    store: Path
    model: Path  # an RQAE or a codebook model directory
    prompts: tuple[str, ...]
    feature: str | None = None  # FILE.json or FILE.json#KEY (a dictionary id or a vMF feature name)
    addresses: tuple[str, ...] = ()  # or query tokens, as `rqae features` takes them
    texts: tuple[str, ...] = ()
    token_indices: tuple[int, ...] = ()
    code: int | None = None  # codebook baseline: the code to activate
    words: tuple[str, ...] = ()  # concept words; default: the feature's example tokens
    codes: Path | None = None
    steer: SteerConfig = field(default_factory=SteerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    device: str | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("give at least one --prompt")


@dataclass(frozen=True)
class Norm:
    """How the store normalised its rows: raw = acts / gain * scale."""

    gain: torch.Tensor  # (d,), ones in "rms" mode
    eps: float
    mode: str


# --------------------------------------------------------------------------- the steering math


def strength_multiplier(strength: float) -> float:
    """kappa' / kappa = s / (1 - s) = exp(logit s): 0 at s = 0, 1 at s = 0.5, inf at s = 1."""
    return float("inf") if strength >= 1.0 else strength / (1.0 - strength)


def steering_layers(vmf: VMF, k: int) -> np.ndarray:
    """The k layers with the largest kappa (ties: earlier layer first), in layer order."""
    n_q = len(vmf.kappa)
    if not 1 <= k <= n_q:
        raise RQAEError(f"--top-k-layers must be in 1..{n_q} (the model's layers), got {k}")
    return np.sort(np.argsort(-np.asarray(vmf.kappa), kind="stable")[:k])


def reference_kappa(vmf: VMF) -> float:
    """The concentration the token's own code is counted with: the feature's median kappa
    over its layers below the cap (1 when that is 0), so the pull of a layer depends on its
    kappa relative to the feature's typical layer and the strength dial works at any absolute
    scale. A capped layer (every query shares its code) has no estimate, only the cap:
    counted in, a feature with half its layers capped had the cap as its reference, and one
    more agreeing layer cut every other layer's pull ~200-fold."""
    estimated = vmf.kappa[~vmf.at_cap]
    ref = float(np.median(estimated)) if estimated.size else KAPPA_MAX
    return ref if ref > 0 else 1.0


def pull_toward_mean(u: torch.Tensor, mean: torch.Tensor, kappa: torch.Tensor, strength: float) -> torch.Tensor:
    """(N, k, 4) unit codes turned toward (k, 4) means: q = normalise(u + kappa' mu).
    Strength 0 returns u itself (bit for bit), strength 1 the means."""
    if strength <= 0.0:
        return u
    if strength >= 1.0:
        return mean.to(u).expand_as(u).clone()
    ks = (kappa.double() * strength_multiplier(strength)).to(u)  # (k,)
    v = u + ks[None, :, None] * mean.to(u)[None]
    n = v.norm(dim=-1, keepdim=True)
    # u = -mu with kappa' = 1 cancels out: any direction is a mode; take the mean
    return torch.where(n > 1e-12, v / n.clamp_min(1e-30), mean.to(u)[None].expand_as(v))


def _to_raw(x: torch.Tensor, scale: torch.Tensor, norm: Norm) -> torch.Tensor:
    return x / norm.gain.to(x) * scale[:, None]


@dataclass(frozen=True)
class SteerStep:
    raw: torch.Tensor  # (N, d) the activation to splice in
    codes: torch.Tensor  # (N, n_q) codes of the clean activation
    steered: torch.Tensor  # (N, k, 4) steered unit codes on the steered layers


@torch.no_grad()
def steer_rqae(model, raw: torch.Tensor, vmf: VMF, layers: np.ndarray, cfg: SteerConfig, norm: Norm) -> SteerStep:
    """Steer raw activations (N, d) at the hook; see the module docstring."""
    from rqae_pipeline.lm import normalise

    x, scale = normalise(raw.float(), norm.gain.to(raw.device), norm.eps, norm.mode)
    codes = model.encode(x).long()
    idx = torch.as_tensor(layers, device=x.device, dtype=torch.long)
    u = model.codebook[codes[:, idx]]  # (N, k, 4)
    mean = torch.as_tensor(vmf.mean[layers], dtype=torch.float32, device=x.device)
    kappa = torch.as_tensor(vmf.kappa[layers] / reference_kappa(vmf), dtype=torch.float64, device=x.device)
    q = pull_toward_mean(u, mean, kappa, cfg.strength)
    change = torch.einsum("nkc,kcd->nd", q - u, model.W_out.detach()[idx]) * model.input_scale
    if cfg.splice == "delta":
        new = raw.float() + _to_raw(change, scale, norm)
    else:
        new = _to_raw(model.decode(codes) + change, scale, norm)
    return SteerStep(raw=new.to(raw.dtype), codes=codes, steered=q)


@dataclass(frozen=True)
class CodebookStep:
    raw: torch.Tensor  # (N, d)
    active: torch.Tensor  # (N, k) active code indices after steering


@torch.no_grad()
def steer_codebook(model, raw: torch.Tensor, code: int, norm: Norm, splice: Splice = "delta") -> CodebookStep:
    """Codebook Features steering: make `code` one of the k active codes (replacing the
    least similar one where it is not active yet) and splice the change of the output."""
    from rqae_pipeline.lm import normalise

    x, scale = normalise(raw.float(), norm.gain.to(raw.device), norm.eps, norm.mode)
    idx = model.encode(x)  # (N, k), most similar first
    missing = ~(idx == code).any(1)
    active = idx.clone()
    active[missing, -1] = code
    change = model.codebook.detach()[active].sum(1) - model.codebook.detach()[idx].sum(1)
    if splice == "delta":
        new = raw.float() + _to_raw(change, scale, norm)
    else:
        new = _to_raw(model.decode(active), scale, norm)
    return CodebookStep(raw=new.to(raw.dtype), active=active)


def splice_hook(step: Callable[[torch.Tensor], torch.Tensor], record: list | None = None):
    """A TransformerLens forward hook applying `step` ((N, d) raw -> (N, d) raw) at every
    position but the first call's position 0 (BOS). With a KV cache the first call is the
    prompt and later calls one new token each. `record` collects (before, after) pairs."""
    state = {"first": True}

    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:  # act: (B, T, d)
        start = 1 if state["first"] else 0
        state["first"] = False
        if act.shape[1] <= start:
            return act
        part = act[:, start:]
        new = step(part.reshape(-1, act.shape[-1])).reshape(part.shape).to(act.dtype)
        if record is not None:
            record.append((part.detach().clone(), new.detach().clone()))
        out = act.clone()
        out[:, start:] = new
        return out

    return hook


# --------------------------------------------------------------------------- checks


def model_architecture(model_dir: Path) -> str:
    from rqae_pipeline.models.registry import architecture_of

    if not (Path(model_dir) / "config.json").exists():
        raise RQAEError(f"{model_dir} is not a model directory written by `rqae train` (no config.json)")
    arch = architecture_of(model_dir)
    if arch not in ("rqae", "codebook"):
        raise RQAEError(f"{model_dir} holds a {arch!r} model; steering needs an RQAE or a codebook model")
    return arch


# --------------------------------------------------------------------------- one strategy per architecture


class RQAESteering:
    """Steer toward a vMF feature (a feature file, or fitted to query tokens once the LM is
    loaded) on the `top_k_layers` layers with the largest kappa."""

    def __init__(self, cfg: SteerRunConfig, store, device: str):
        from rqae_pipeline.models.rqae import RQAE

        if cfg.code is not None:
            raise RQAEError("--code steers a codebook model; an RQAE steers with --feature or query tokens")
        if (cfg.feature is None) == (not cfg.addresses and not cfg.texts):
            raise RQAEError("give one feature: --feature FILE.json[#ID] or query tokens (--query/--address)")
        self.cfg, self.store = cfg, store
        self.model = RQAE.load(cfg.model, device)
        self.feature: SteerFeature | None = None
        self.layers = np.empty(0, np.int64)

    def check_before_lm(self) -> None:
        """Load a feature file and check the layer count, before the LM is loaded."""
        if self.cfg.feature is not None:
            self.feature = load_feature(self.cfg.feature, self.store, self.cfg.model, self.model, self.cfg.codes)
        n_q, k = self.model.n_q, self.cfg.steer.top_k_layers
        if not 1 <= k <= n_q:
            raise RQAEError(f"--top-k-layers must be in 1..{n_q} (the model's layers), got {k}")

    def prepare(self, lm) -> None:
        if self.feature is None:
            self.feature = query_feature(self.cfg, self.store, self.model, lm)
        self.layers = steering_layers(self.feature.vmf, self.cfg.steer.top_k_layers)

    @property
    def words(self) -> tuple[str, ...]:
        return self.feature.words

    def step(self, norm: Norm) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda raw: steer_rqae(self.model, raw, self.feature.vmf, self.layers, self.cfg.steer, norm).raw

    def describe(self) -> dict:
        vmf, strength = self.feature.vmf, self.cfg.steer.strength
        return {"feature": {"name": self.feature.name, "queries": vmf.n,
                            "layers": [int(i) + 1 for i in self.layers],
                            "kappa": [float(vmf.kappa[i]) for i in self.layers],
                            "layers_at_cap": [int(i) + 1 for i in self.layers if vmf.at_cap[i]],
                            "kappa_reference": reference_kappa(vmf),
                            "kappa_multiplier": None if strength >= 1 else strength_multiplier(strength)}}


class CodebookSteering:
    """Codebook Features steering: activate one code at every position."""

    def __init__(self, cfg: SteerRunConfig, store, device: str):
        from rqae_pipeline.models.codebook import CodebookAE

        if cfg.code is None or cfg.feature is not None or cfg.addresses or cfg.texts:
            raise RQAEError("a codebook model steers with --code N (the code to activate)")
        self.cfg = cfg
        self.model = CodebookAE.load(cfg.model, device)
        if not 0 <= cfg.code < self.model.cfg.n_codes:
            raise RQAEError(f"--code must be in 0..{self.model.cfg.n_codes - 1}, got {cfg.code}")
        rqae_only = SteerConfig(splice=cfg.steer.splice)  # what a codebook run leaves as it is
        if (cfg.steer.strength, cfg.steer.top_k_layers) != (rqae_only.strength, rqae_only.top_k_layers):
            raise RQAEError("a codebook model activates its code fully: --strength and --top-k-layers steer an "
                            "RQAE only")

    def check_before_lm(self) -> None:
        pass

    def prepare(self, lm) -> None:
        pass

    words: tuple[str, ...] = ()  # no feature to take concept words from: give --word

    def step(self, norm: Norm) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda raw: steer_codebook(self.model, raw, self.cfg.code, norm, self.cfg.steer.splice).raw

    def describe(self) -> dict:
        # strength and layers do not apply: the result records only the splice
        return {"code": self.cfg.code, "steer": {"splice": self.cfg.steer.splice}}


STRATEGIES = {"rqae": RQAESteering, "codebook": CodebookSteering}


# --------------------------------------------------------------------------- the run


def _prompt_ids(tokenizer, prompts: tuple[str, ...]) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RQAEError(f"the prompt {p!r} tokenises to no tokens; give some text")
        out.append(list(ids))
    return out


def run_steering(cfg: SteerRunConfig, *, lm=None, echo: Callable[[str], None] | None = None) -> dict:
    """Generate from each prompt with and without steering (same seed) and count the concept.
    Every input is checked before the language model is loaded."""
    from rqae_pipeline.lm import default_device
    from rqae_pipeline.queries import check_lm, load_store_lm, load_tokenizer
    from rqae_pipeline.store import ActivationStore

    store = ActivationStore.open(cfg.store)
    arch = model_architecture(cfg.model)
    steering = STRATEGIES[arch](cfg, store, cfg.device or default_device())
    check_model_store(cfg.model, steering.model.cfg.d_in, store)
    prompt_ids = _prompt_ids(lm.tokenizer if lm is not None else load_tokenizer(store.spec.model), cfg.prompts)
    if not all(any(ch.isalnum() for ch in w) for w in cfg.words):  # "" would match at every position
        raise RQAEError(f"--word needs letters or digits in each word, got {list(cfg.words)}")
    steering.check_before_lm()
    if lm is None:
        if echo:
            echo(f"loading {store.spec.model} ...")
        lm = load_store_lm(store, device=cfg.device or default_device())
    check_lm(lm, store)
    longest, n_ctx = 1 + max(map(len, prompt_ids)) + cfg.generation.max_new_tokens, lm.model.cfg.n_ctx
    if longest > n_ctx:  # BOS + prompt + new tokens: past the LM's positions there is no generation
        raise RQAEError(f"BOS, the longest prompt and --max-new-tokens make {longest} tokens; {store.spec.model} "
                        f"takes {n_ctx}")
    steering.prepare(lm)
    words = tuple(w.lower() for w in cfg.words) or steering.words
    if not words:
        raise RQAEError("no concept words to count: give --word (repeatable)")
    norm = Norm(gain=store.gain,  # ones in "rms" mode
                eps=float(lm.model.cfg.eps), mode=store.spec.normalisation)
    generations = generate_both(cfg, lm, store.spec.hook, prompt_ids, steering.step(norm), echo)
    return {
        "store": str(store.path), "model": str(cfg.model), "architecture": arch, "hook": store.spec.hook,
        "steer": asdict(cfg.steer), "generation": asdict(cfg.generation), "words": list(words),
        "baseline": concept_frequency([t for g in generations for t in g["baseline"]], words),
        "steered": concept_frequency([t for g in generations for t in g["steered"]], words),
        "generations": generations, **steering.describe(),
    }


def generate_both(cfg: SteerRunConfig, lm, hook: str, prompt_ids: list[list[int]],
                  step: Callable[[torch.Tensor], torch.Tensor], echo: Callable[[str], None] | None) -> list[dict]:
    """For each prompt: the baseline and the steered continuations, from the same seed."""
    results = []
    for prompt, ids in zip(cfg.prompts, prompt_ids):
        if echo:
            echo(f"generating from {prompt!r} ...")
        base = generate(lm, hook, ids, cfg.generation)
        steered = generate(lm, hook, ids, cfg.generation, hook=splice_hook(step))
        results.append({"prompt": prompt, "baseline": [decode_continuation(lm.tokenizer, t) for t in base.tolist()],
                        "steered": [decode_continuation(lm.tokenizer, t) for t in steered.tolist()]})
    return results


def steering_lines(result: dict) -> list[str]:
    """The terminal output of `rqae steer`."""
    what = (f"feature {result['feature']['name']} on layers {result['feature']['layers']}, "
            f"strength {result['steer']['strength']}" if "feature" in result else f"code {result['code']}")
    lines = [f"steering {what}"]
    capped = result.get("feature", {}).get("layers_at_cap")
    if capped:
        lines.append(f"layers {capped}: every query shares its code there; their kappa is the cap ({KAPPA_MAX:g}), "
                     f"not an estimate")
    for g in result["generations"]:
        for label in ("baseline", "steered"):
            lines += [f"[{label} {i}] {g['prompt']}{text}".replace("\n", "\\n") for i, text in enumerate(g[label])]
    b, s = result["baseline"], result["steered"]
    lines.append(f"concept words: {', '.join(result['words'])}")
    lines.append(f"generations containing the concept: baseline {b['fraction']:.0%} "
                 f"({b['mean_count']:.2f} per generation), steered {s['fraction']:.0%} ({s['mean_count']:.2f})")
    return lines
