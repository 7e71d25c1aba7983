"""Query tokens for feature search: from free text (through the LM) or a stored token's address,
and the text around stored tokens for showing hits.

A query text goes through exactly what a stored row went through: BOS + tokens, the LM
forward pass to the store's hook, the store's normalisation (final-norm gain or pure RMS),
and the store's storage codec (fp16 / fp8 rounding), then `RQAE.encode`. So a stored
context queried by its token ids gets its stored codes, and query and store are compared
like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.codec import decode_acts, encode_acts
from rqae_pipeline.forward import cuda_tf32, hook_residuals
from rqae_pipeline.lm import load_tokenizer
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.store_format import recorded_precision


@dataclass(frozen=True)
class TextCodes:
    tokens: list[int]  # the text's token ids (the BOS fed in front is not counted)
    codes: np.ndarray  # (len(tokens), n_q) int16


@dataclass(frozen=True)
class Context:
    """A stored token and the text either side of it, inside its own context."""

    row: int
    seq: int
    pos: int
    left: str
    token: str
    right: str

    def render(self, mark: tuple[str, str] = ("[[", "]]")) -> str:
        text = f"{self.left}{mark[0]}{self.token}{mark[1]}{self.right}"
        return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", " ")

    def to_dict(self) -> dict:
        return {"row": self.row, "seq": self.seq, "pos": self.pos, "left": self.left, "token": self.token,
                "right": self.right}


# --------------------------------------------------------------------------- tokenizers


# --------------------------------------------------------------------------- query codes


def load_store_lm(store: ActivationStore, device: str | None = None):
    """The store's LM at the precision its rows were harvested in (`store_format.recorded_precision`):
    a stored context given as text then encodes to its stored codes, not to the codes of a
    float32 forward of a bfloat16 store (which differ on rows near a code boundary)."""
    from rqae_pipeline.lm import load_lm

    return load_lm(store.spec.model, device=device, dtype=recorded_precision(store.manifest)["model_dtype"])


def check_lm(lm, store: ActivationStore) -> None:
    if lm.name != store.spec.model or lm.d_model != store.d:
        raise RQAEError(f"the store was harvested from {store.spec.model!r}, not {lm.name!r}")


def tokenize(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RQAEError(f"the query text {text!r} tokenises to no tokens; give some text")
    return list(ids)


@torch.inference_mode()
def encode_tokens(lm, model, store: ActivationStore, ids: list[int]) -> np.ndarray:
    """(len(ids), n_q) codes of token ids read as one context after BOS, as harvested."""
    check_lm(lm, store)
    spec = store.spec
    if not ids:
        raise RQAEError("no query tokens to encode")
    body = spec.context_length - 1
    if len(ids) > body:
        raise RQAEError(f"the query has {len(ids)} tokens; the store's contexts hold {body} after BOS")
    tokens = torch.tensor([[lm.tokenizer.bos_token_id, *ids]], device=lm.model.cfg.device)
    with cuda_tf32(recorded_precision(store.manifest)["tf32"]):  # the harvest's matmul precision, on a GPU
        raw = hook_residuals(lm, tokens, spec.hook, spec.layer)
    acts, _ = store.to_normalised(raw[0, 1:].float(), float(lm.model.cfg.eps))
    acts = acts.cpu()
    mean = store.codec_mean()
    cols = encode_acts(acts, spec.dtype, mean)  # the storage rounding a stored row went through
    acts = decode_acts(cols["acts"], spec.dtype, cols.get("row_scale"), mean)
    device = next(model.parameters()).device
    return model.encode(acts.to(device)).cpu().numpy().astype(np.int16)


def encode_text(lm, model, store: ActivationStore, text: str) -> TextCodes:
    ids = tokenize(lm.tokenizer, text)
    return TextCodes(tokens=ids, codes=encode_tokens(lm, model, store, ids))


def pick_token(n_tokens: int, token_index: int) -> int:
    """Python-style index into the query's tokens (negative counts from the end)."""
    if not -n_tokens <= token_index < n_tokens:
        raise RQAEError(f"token index {token_index} is out of range: the query has {n_tokens} token(s) "
                        f"(0..{n_tokens - 1}, or -{n_tokens}..-1)")
    return token_index % n_tokens


def query_codes(lm, model, store: ActivationStore, text: str, token_index: int) -> np.ndarray:
    """(n_q,) codes of token `token_index` of `text` (the blog's query token, step 1)."""
    tc = encode_text(lm, model, store, text)
    return tc.codes[pick_token(len(tc.tokens), token_index)]


def text_context(tokenizer, ids: list[int], index: int, width: int = 8) -> Context:
    """A query text shown like a hit (row, seq and pos are -1: it is not a stored token)."""
    a, b = max(0, index - width), min(len(ids), index + width + 1)
    dec = tokenizer.decode
    return Context(row=-1, seq=-1, pos=-1, left=dec(ids[a:index]), token=dec([ids[index]]), right=dec(ids[index + 1:b]))


# --------------------------------------------------------------------------- stored tokens


def parse_address(text: str) -> tuple[int, int]:
    seq, sep, pos = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(seq), int(pos)
    except ValueError:
        raise RQAEError(f"an address is SEQ:POS (context and position), got {text!r}") from None


def address_row(store: ActivationStore, seq: int, pos: int) -> int:
    """Row of the stored token at context `seq`, position `pos` (rows are whole contexts, in order)."""
    R, off = store.spec.rows_per_context, 1 if store.spec.skip_bos else 0
    if not 0 <= seq < store.n_contexts:
        raise RQAEError(f"context {seq} is not in the store (contexts 0..{store.n_contexts - 1})")
    if not off <= pos < off + R:
        raise RQAEError(f"position {pos} is not stored (positions {off}..{off + R - 1})")
    row = seq * R + pos - off
    got = store.columns(slice(row, row + 1), "seq", "pos")
    got_seq, got_pos = int(got["seq"][0]), int(got["pos"][0])
    if got_seq != seq or got_pos != pos:  # guards the layout assumption
        raise RQAEError(f"row {row} holds {got_seq}:{got_pos}, not {seq}:{pos}")
    return row


def contexts(store: ActivationStore, tokenizer, rows, width: int = 8) -> list[Context]:
    """Each row's token with up to `width` tokens either side, inside its own context."""
    R, out = store.spec.rows_per_context, []
    cache: dict[int, tuple[list, np.ndarray, np.ndarray]] = {}  # one read per context shown

    def dec(t):
        return tokenizer.decode(t, skip_special_tokens=True)

    for r in (int(r) for r in rows):
        start = r - r % R
        if start not in cache:
            cols = store.columns(slice(start, start + R), "tokens", "seq", "pos")
            cache[start] = (cols["tokens"].tolist(), cols["seq"], cols["pos"])
        ids, seq, pos = cache[start]
        i = r - start
        a, b = max(0, i - width), min(len(ids), i + width + 1)
        out.append(Context(row=r, seq=int(seq[i]), pos=int(pos[i]), left=dec(ids[a:i]),
                           token=tokenizer.decode([ids[i]]), right=dec(ids[i + 1:b])))
    return out


# --------------------------------------------------------------------------- query sets


@dataclass(frozen=True)
class Query:
    """One query token: a stored row (codes read from the codes store) or a text token (encoded)."""

    context: Context
    row: int | None = None
    codes: np.ndarray | None = None  # (n_q,), for text queries


def pair_text_queries(texts: list[str], token_indices: list[int]) -> list[tuple[str, int]]:
    """--query / --token-index pairs: one of either side is shared by all of the other."""
    if not texts:
        if token_indices:
            raise RQAEError("--token-index needs a --query text")
        return []
    if not token_indices:
        token_indices = [-1]
    if len(texts) == 1 or len(token_indices) == 1:
        n = max(len(texts), len(token_indices))
        return [(texts[i % len(texts)], token_indices[i % len(token_indices)]) for i in range(n)]
    if len(texts) != len(token_indices):
        raise RQAEError(f"{len(texts)} --query texts but {len(token_indices)} --token-index values; give one "
                        f"index per text, or one for all")
    return list(zip(texts, token_indices))


def query_set(store: ActivationStore, model, *, addresses: list[str] = (), texts: list[str] = (),
              token_indices: list[int] = (), lm=None, width: int = 8) -> list[Query]:
    """Validate and resolve every query token before any long work starts: addresses to rows,
    texts through the LM (loaded only when a text is given) to codes."""
    pairs = pair_text_queries(list(texts), list(token_indices))
    if not addresses and not pairs:
        raise RQAEError("no query tokens: give --address SEQ:POS or --query TEXT [--token-index I]")
    rows = [address_row(store, *parse_address(a)) for a in addresses]
    tokenizer = lm.tokenizer if lm is not None else load_tokenizer(store.spec.model)
    picked = [(text, pick_token(len(tokenize(tokenizer, text)), index)) for text, index in pairs]  # before the LM loads
    refuse_repeats([(f"--address {a}", r) for a, r in zip(addresses, rows)] +
                   [(f"--query {text!r} token {i}", (text, i)) for text, i in picked])
    if pairs and lm is None:
        lm = load_store_lm(store)
    out = [Query(context=c, row=c.row) for c in contexts(store, tokenizer, rows, width)]
    encoded: dict[str, TextCodes] = {}
    for text, index in pairs:
        if text not in encoded:
            encoded[text] = encode_text(lm, model, store, text)
        tc = encoded[text]
        i = pick_token(len(tc.tokens), index)
        out.append(Query(context=text_context(tokenizer, tc.tokens, i, width), codes=tc.codes[i]))
    return out


def refuse_repeats(named: list[tuple[str, object]]) -> None:
    """One query token given twice would count twice in a feature's fit (two identical codes
    on every layer: a vMF at the cap everywhere, from one token)."""
    first: dict = {}
    for name, key in named:
        if key in first:
            raise RQAEError(f"{name} is the same query token as {first[key]}; give each token once")
        first[key] = name


def query_codes_matrix(queries: list[Query], codes) -> np.ndarray:
    """(k, n_q) codes of the query tokens; stored rows are read from the codes store."""
    out = []
    for q in queries:
        out.append(q.codes if q.codes is not None else codes.read_rows(np.array([q.row]))[0])
    return np.stack(out).astype(np.int16)
