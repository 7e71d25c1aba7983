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
word list), with and without steering, from the same prompts and sampling seed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.features import VMF

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
class GenerationConfig:
    max_new_tokens: int = 32
    samples: int = 4  # generations per prompt (one batch)
    temperature: float = 0.5  # 0: greedy
    repetition_penalty: float = 1.5  # CTRL-style; 1: off (the blog's examples use 1.5)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.samples < 1:
            raise ValueError("--max-new-tokens and --samples must be positive")
        if self.temperature < 0 or self.repetition_penalty <= 0:
            raise ValueError("--temperature must be >= 0 and --repetition-penalty > 0")


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
class SteerFeature:
    name: str
    vmf: VMF
    words: tuple[str, ...]  # concept words for the topic measure


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
    over all layers (1 when that is 0), so the pull of a layer depends on its kappa relative
    to the feature's typical layer and the strength dial works at any absolute scale."""
    ref = float(np.median(vmf.kappa))
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


# --------------------------------------------------------------------------- generation


def _sample(logits: torch.Tensor, seen: torch.Tensor, gen: GenerationConfig, g: torch.Generator) -> torch.Tensor:
    logits = logits.float().clone()
    if gen.repetition_penalty != 1.0:
        prev = logits.gather(1, seen)
        logits.scatter_(1, seen, torch.where(prev > 0, prev / gen.repetition_penalty, prev * gen.repetition_penalty))
    if gen.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / gen.temperature, -1)
    return torch.multinomial(probs, 1, generator=g)[:, 0]


def _last_logits(model, toks: torch.Tensor, cache) -> torch.Tensor:
    """(B, vocab) logits at the last position. The blocks run through TransformerLens (hooks
    and the KV cache apply); the unembedding is done here for the last position only, as
    TransformerLens's own copies the transposed (d, vocab) matrix on every call (670 MB for
    Gemma-3's 262k vocabulary, most of a generation step on a CPU)."""
    resid = model(toks, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)[:, -1]
    logits = model.ln_final(resid[:, None])[:, 0] @ model.W_U + model.b_U
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0) or -1.0
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits.float().cpu()


@torch.no_grad()
def generate(lm, hook_name: str, ids: list[int], gen: GenerationConfig, hook=None,
             logits_out: list | None = None) -> torch.Tensor:
    """(samples, max_new_tokens) tokens continuing BOS + ids, with `hook` at `hook_name`.
    A KV cache keeps each step to one new token; sampling runs on the CPU from a generator
    seeded with `gen.seed`, so two runs differ only through the hook."""
    from transformer_lens import TransformerLensKeyValueCache

    model, dev = lm.model, lm.model.cfg.device
    toks = torch.tensor([[lm.tokenizer.bos_token_id, *ids]] * gen.samples, device=dev)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, gen.samples)
    g = torch.Generator().manual_seed(gen.seed)
    seen, out = toks.cpu(), []
    with model.hooks(fwd_hooks=[(hook_name, hook)] if hook is not None else []):
        logits = _last_logits(model, toks, cache)
        for t in range(gen.max_new_tokens):
            if logits_out is not None:
                logits_out.append(logits)
            nxt = _sample(logits, seen, gen, g)
            out.append(nxt)
            seen = torch.cat([seen, nxt[:, None]], 1)
            if t + 1 < gen.max_new_tokens:
                logits = _last_logits(model, nxt[:, None].to(dev), cache)
    return torch.stack(out, 1)


def decode_continuation(tokenizer, tokens: list[int]) -> str:
    eos = tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


# --------------------------------------------------------------------------- the topic measure


def concept_words(tokens: list[str], limit: int = 32) -> tuple[str, ...]:
    """Distinct lower-cased words among tokens (>= 2 characters, at least one letter)."""
    out: list[str] = []
    for t in tokens:
        w = t.strip().lower()
        if len(w) >= 2 and any(ch.isalpha() for ch in w) and w not in out:
            out.append(w)
    return tuple(out[:limit])


def concept_frequency(texts: list[str], words: tuple[str, ...]) -> dict:
    """Codebook Features' topic-steering measure: the share of texts containing any of the
    words (whole words, case-insensitive), and the mean number of occurrences."""
    if not texts:
        return {"fraction": 0.0, "mean_count": 0.0, "contains": []}
    if not words:
        raise RQAEError("no concept words to count; give --word")
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                         + r")(?!\w)", re.IGNORECASE)
    counts = [len(pattern.findall(t)) for t in texts]
    return {"fraction": sum(c > 0 for c in counts) / len(texts), "mean_count": float(np.mean(counts)),
            "contains": [c > 0 for c in counts]}


# --------------------------------------------------------------------------- features and checks


def model_architecture(model_dir: Path) -> str:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise RQAEError(f"{model_dir} is not a model directory written by `rqae train` (no config.json)")
    arch = json.loads(path.read_text()).get("architecture")
    if arch not in ("rqae", "codebook"):
        raise RQAEError(f"{model_dir} holds a {arch!r} model; steering needs an RQAE or a codebook model")
    return arch


def first_difference(a: dict, b: dict) -> str | None:
    for key in sorted(set(a) | set(b)):
        if key != "tokenizer" and a.get(key) != b.get(key):  # the tokenizer path is machine-specific
            return key
    return None


def check_model_store(model_dir: Path, d_in: int, store) -> None:
    """The model must read this store's activations: same width, and (when the run recorded
    it) trained on a store with the same spec."""
    if d_in != store.d:
        raise RQAEError(f"model {model_dir} reads d={d_in} but the store holds d={store.d}")
    run = Path(model_dir) / "train.json"
    spec = json.loads(run.read_text()).get("store_spec") if run.exists() else None
    if spec:
        key = first_difference(spec, store.manifest["spec"])
        if key is not None:
            raise RQAEError(f"model {model_dir} was trained on another store ({key}: {spec.get(key)!r}, "
                            f"this store: {store.manifest['spec'].get(key)!r})")


def parse_feature_ref(ref: str) -> tuple[Path, str | None]:
    path, sep, key = ref.partition("#")
    return Path(path), (key if sep else None)


def load_feature(ref: str, store, model_dir: Path, model, codes_path: Path | None = None) -> SteerFeature:
    """A feature from a file: `DICT.json#ID` (a feature-dictionary entry: a vMF fitted to its
    top examples' codes) or `FEATURE.json[#NAME]` (a vMF written by `rqae features --out`;
    default the feature fitted on all queries)."""
    path, key = parse_feature_ref(ref)
    if not path.is_file():
        raise RQAEError(f"unknown feature {ref!r}: no feature file {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise RQAEError(f"{path} is not JSON; give a feature dictionary or a `rqae features --out` file") from None
    if isinstance(data, dict) and data.get("kind") == "rqae-feature-dictionary":
        return _dictionary_feature(data, path, key, store, model_dir, model, codes_path)
    if isinstance(data, dict) and isinstance(data.get("features"), list) and data["features"] and "vmf" in data["features"][0]:
        return _vmf_file_feature(data, path, key, model)
    raise RQAEError(f"{path} is neither a feature dictionary nor a `rqae features --out` file")


def check_dictionary(data: dict, path: Path, store, identity: dict, model_dir: Path) -> None:
    """A feature dictionary must come from this model and this store."""
    if data["model"]["weights_sha256"] != identity["weights_sha256"]:
        raise RQAEError(f"{path} was built with another model ({data['model']['name']}), not {model_dir}")
    key = first_difference(data["store_spec"], store.manifest["spec"])
    if key is not None:
        raise RQAEError(f"{path} was built from another store than {store.path} ({key} differs)")


def _dictionary_feature(data, path, key, store, model_dir, model, codes_path) -> SteerFeature:
    from rqae_pipeline.codes import ensure_codes, model_identity
    from rqae_pipeline.features import fit_vmf

    ids = [f["id"] for f in data["features"]]
    if key is None or key not in ids:
        what = "give one as" if key is None else f"there is no feature {key!r} in it; use"
        raise RQAEError(f"{path} is a feature dictionary: {what} {path}#ID ({ids[0]} .. {ids[-1]})" if ids
                        else f"{path} holds no features")
    check_dictionary(data, path, store, model_identity(model_dir), model_dir)
    feat = data["features"][ids.index(key)]
    rows = np.array([e["row"] for e in feat["examples"]], dtype=np.int64)
    codes = ensure_codes(store, model_dir, codes_path).read_rows(rows)
    return SteerFeature(name=key, vmf=fit_vmf(model, codes), words=concept_words([e["token"] for e in feat["examples"]]))


def _vmf_file_feature(data, path, key, model) -> SteerFeature:
    names = [f.get("name") for f in data["features"]]
    name = key if key is not None else names[0]
    if name not in names:
        raise RQAEError(f"there is no feature {name!r} in {path}; it has {', '.join(map(str, names))}")
    feat = data["features"][names.index(name)]
    v = feat["vmf"]
    vmf = VMF(mean=np.asarray(v["mean"], np.float64), kappa=np.asarray(v["kappa"], np.float64), n=int(v["n"]))
    if vmf.mean.shape != (model.n_q, 4):
        raise RQAEError(f"the feature in {path} has {len(vmf.kappa)} layers but the model has {model.n_q}")
    tokens = [q["token"] for q in data.get("queries", [])] + [h["token"] for h in feat.get("hits", [])]
    return SteerFeature(name=f"{path.name}#{name}", vmf=vmf, words=concept_words(tokens))


def query_feature(cfg: SteerRunConfig, store, model, lm) -> SteerFeature:
    """A vMF fitted to query tokens given like `rqae features` takes them; the concept words
    are the query tokens and the feature's top hits in the store."""
    from rqae_pipeline.codes import ensure_codes
    from rqae_pipeline.features import fit_vmf, search, vmf_feature
    from rqae_pipeline.queries import contexts, query_codes_matrix, query_set

    qs = query_set(store, model, addresses=list(cfg.addresses), texts=list(cfg.texts),
                   token_indices=list(cfg.token_indices), lm=lm)
    codes = ensure_codes(store, cfg.model, cfg.codes)
    vmf = fit_vmf(model, query_codes_matrix(qs, codes))
    hits = search(model, codes, vmf_feature(model, vmf), top_k=16, store=store)
    tokens = [q.context.token for q in qs] + [c.token for c in contexts(store, lm.tokenizer, [h.row for h in hits], 0)]
    name = " | ".join(q.context.render() for q in qs[:3]) + (" ..." if len(qs) > 3 else "")
    return SteerFeature(name=name, vmf=vmf, words=concept_words(tokens))


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
    from rqae_pipeline.lm import default_device, load_lm
    from rqae_pipeline.queries import check_lm, load_tokenizer
    from rqae_pipeline.store import ActivationStore

    store = ActivationStore.open(cfg.store)
    arch = model_architecture(cfg.model)
    device = cfg.device or default_device()
    if arch == "rqae":
        from rqae_pipeline.models.rqae import RQAE

        if cfg.code is not None:
            raise RQAEError("--code steers a codebook model; an RQAE steers with --feature or query tokens")
        if (cfg.feature is None) == (not cfg.addresses and not cfg.texts):
            raise RQAEError("give one feature: --feature FILE.json[#ID] or query tokens (--query/--address)")
        model = RQAE.load(cfg.model, device)
    else:
        from rqae_pipeline.models.codebook import CodebookAE

        if cfg.code is None or cfg.feature is not None or cfg.addresses or cfg.texts:
            raise RQAEError("a codebook model steers with --code N (the code to activate)")
        model = CodebookAE.load(cfg.model, device)
        if not 0 <= cfg.code < model.cfg.n_codes:
            raise RQAEError(f"--code must be in 0..{model.cfg.n_codes - 1}, got {cfg.code}")
    check_model_store(cfg.model, model.cfg.d_in, store)
    tokenizer = lm.tokenizer if lm is not None else load_tokenizer(store.spec.model)
    prompt_ids = _prompt_ids(tokenizer, cfg.prompts)
    feature = None
    if arch == "rqae" and cfg.feature is not None:
        feature = load_feature(cfg.feature, store, cfg.model, model, cfg.codes)
    if arch == "rqae":
        n_q = model.n_q
        if not 1 <= cfg.steer.top_k_layers <= n_q:
            raise RQAEError(f"--top-k-layers must be in 1..{n_q} (the model's layers), got {cfg.steer.top_k_layers}")
    if lm is None:
        if echo:
            echo(f"loading {store.spec.model} ...")
        lm = load_lm(store.spec.model, device=device)
    check_lm(lm, store)
    if arch == "rqae" and feature is None:
        feature = query_feature(cfg, store, model, lm)
    words = tuple(w.lower() for w in cfg.words) or (feature.words if feature else ())
    if not words:
        raise RQAEError("no concept words to count: give --word (repeatable)")
    norm = Norm(gain=store.gain if store.spec.normalisation == "final-norm" else torch.ones(store.d),
                eps=float(lm.model.cfg.eps), mode=store.spec.normalisation)
    if arch == "rqae":
        layers = steering_layers(feature.vmf, cfg.steer.top_k_layers)

        def step(raw):
            return steer_rqae(model, raw, feature.vmf, layers, cfg.steer, norm).raw
    else:
        layers = np.empty(0, np.int64)

        def step(raw):
            return steer_codebook(model, raw, cfg.code, norm, cfg.steer.splice).raw

    results, base_texts, steered_texts = [], [], []
    for prompt, ids in zip(cfg.prompts, prompt_ids):
        if echo:
            echo(f"generating from {prompt!r} ...")
        base = generate(lm, store.spec.hook, ids, cfg.generation)
        steered = generate(lm, store.spec.hook, ids, cfg.generation, hook=splice_hook(step))
        b = [decode_continuation(lm.tokenizer, t) for t in base.tolist()]
        s = [decode_continuation(lm.tokenizer, t) for t in steered.tolist()]
        base_texts += b
        steered_texts += s
        results.append({"prompt": prompt, "baseline": b, "steered": s})
    out = {
        "store": str(store.path), "model": str(cfg.model), "architecture": arch, "hook": store.spec.hook,
        "steer": asdict(cfg.steer), "generation": asdict(cfg.generation), "words": list(words),
        "baseline": concept_frequency(base_texts, words), "steered": concept_frequency(steered_texts, words),
        "generations": results,
    }
    if arch == "rqae":
        k = feature.vmf.kappa
        out["feature"] = {"name": feature.name, "queries": feature.vmf.n,
                          "layers": [int(i) + 1 for i in layers], "kappa": [float(k[i]) for i in layers],
                          "kappa_reference": reference_kappa(feature.vmf),
                          "kappa_multiplier": None if cfg.steer.strength >= 1 else strength_multiplier(cfg.steer.strength)}
    else:
        out["code"] = cfg.code
    return out
