"""Sampling continuations with a TransformerLens model (KV cache, optional hook at the store's
hook point) and the topic measure of steering: how often generations contain a concept's words.

The measure is the Codebook Features paper's (Tamkin et al. 2023): the share of generations
that contain a word of the concept, with and without steering, from the same prompts and
sampling seed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from rqae_pipeline import RQAEError


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
        if not (0 <= self.temperature < math.inf and 0 < self.repetition_penalty < math.inf):  # NaN fails too
            raise ValueError("--temperature must be >= 0 and --repetition-penalty > 0, both finite")


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
