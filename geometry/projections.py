"""Pattern and message projections compared with the vocabulary.

In the row-vector convention of ``core.weights`` (q = x W_Q, k = y W_K, score = q . k):

    pattern  p = x W_Q W_K^T   (the issue's x W^P with W^P = W_Q^T W_K in nn.Linear's [out, in] layout)
    message  m = x W_V W_O     (likewise W^M = W_V^T W_O)

p is the direction in model space that a key input y must point along to get attention from x; m is what
the head writes for x. Both are computed as two thin products ([d_model -> d_head -> d_model]), never as a
d_model x d_model matrix per head, for all layers, heads and inputs at once.

Shapes: inputs x ``[N, L, d_model]`` (one vector per input and layer) -> projections ``[N, L, H, d_model]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from attnlab.core.errors import InputError
from attnlab.core.models import LoadedModel
from attnlab.core.weights import HeadWeights


def project(x: torch.Tensor, w: HeadWeights, kind: str, layers: list[int]) -> torch.Tensor:
    """x ``[N, len(layers), d_model]`` -> ``[N, len(layers), H, d_model]`` patterns or messages."""
    idx = torch.tensor(layers)
    if kind == "pattern":
        a, b = w.W_Q[idx], w.W_K[idx]  # [L, H, d_model, d_head]
    elif kind == "message":
        a, b = w.W_V[idx], w.W_O[idx].transpose(-1, -2)  # W_O [L,H,d_head,d_model] -> [L,H,d_model,d_head]
    else:
        raise ValueError(f"kind must be 'pattern' or 'message', got {kind!r}")
    inner = torch.einsum("nlm,lhmd->nlhd", x, a)
    return torch.einsum("nlhd,lhmd->nlhm", inner, b)


def explicit_matrix(w: HeadWeights, kind: str, layer: int, head: int) -> torch.Tensor:
    """The d_model x d_model matrix itself (only when asked for): W_Q W_K^T or W_V W_O."""
    if kind == "pattern":
        return w.W_Q[layer, head] @ w.W_K[layer, head].T
    return w.W_V[layer, head] @ w.W_O[layer, head]


def spectrum(w: HeadWeights, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values ``[L, H, d_head]`` and effective rank ``[L, H]`` of every head's W^P or W^M.

    W_a W_b^T = Q_a (R_a R_b^T) Q_b^T with thin QR factors, so the singular values are those of the small
    d_head x d_head core. Effective rank: exp(entropy of the normalised singular values) (Roy & Vetterli).
    """
    if kind == "pattern":
        a, b = w.W_Q, w.W_K
    else:
        a, b = w.W_V, w.W_O.transpose(-1, -2)
    _, ra = torch.linalg.qr(a.double())
    _, rb = torch.linalg.qr(b.double())
    s = torch.linalg.svdvals(ra @ rb.transpose(-1, -2))
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return s.float(), torch.exp(entropy).float()


def layer_input_norm(lm: LoadedModel, layer: int):
    """The norm whose output a layer's attention reads: the layer's own (pre-LN families) or, post-LN, the
    previous sublayer's (BERT-style encoders: the embedding LayerNorm for layer 0). None when the family's
    record does not name one (then inputs are compared as they are)."""
    norm = lm.arch.attn_norm(lm.base, layer)
    if norm is not None:
        return norm
    bert_layers = lm.arch.bert_layers
    if bert_layers is None:
        return None
    if layer == 0:
        return lm.base.embeddings.LayerNorm
    return bert_layers(lm.base)[layer - 1].output.LayerNorm


@dataclass
class VocabFilter:
    special: bool = True  # drop [CLS], [SEP], [unusedN], <|endoftext|>, ...
    subwords: bool = False  # drop BERT '##' continuation pieces
    bpe_fragments: bool = False  # drop GPT-2 tokens without a leading space marker 'Ġ'
    high_bias: bool = False  # drop tokens that rank top-k for over half of all (input, layer, head) rows

    def allowed(self, tokenizer, vocab_size: int) -> torch.Tensor:
        keep = torch.ones(vocab_size, dtype=torch.bool)
        if tokenizer is None:
            return keep
        tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        special = set(tokenizer.all_special_ids)
        for i, tok in enumerate(tokens):
            tok = tok or ""
            if self.special and (i in special or (tok.startswith("[") and tok.endswith("]")) or tok.startswith("<|")):
                keep[i] = False
            elif self.subwords and tok.startswith("##"):
                keep[i] = False
            elif self.bpe_fragments and not tok.startswith("Ġ"):
                keep[i] = False
        return keep


def top_k_vocab(vectors: torch.Tensor, vocab: torch.Tensor, k: int, allowed: torch.Tensor | None = None,
                chunk: int = 2048, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each row of ``vectors [R, d]`` against ``vocab [V, d]`` -> (values, ids) ``[R, k]``.

    Chunked over rows so the [R, V] similarity matrix never exists whole. Unless ``exact``, candidates are
    found with a bfloat16 product (2-3x faster on CPUs with bf16 units) and the best ``max(4k, k+32)`` of them
    are re-scored in float32, so the returned values are float32 cosines and the order is exact unless a true
    top-k token falls more than ~4k ranks behind under bf16 rounding (|error| ~ 1e-3 of a cosine).
    """
    v = torch.nn.functional.normalize(vocab.float(), dim=-1)
    if allowed is not None:
        ids_allowed = allowed.nonzero()[:, 0]
        v = v[ids_allowed]
    k = min(k, v.shape[0])
    n_cand = min(v.shape[0], max(4 * k, k + 32))
    v_low = None if exact else v.to(torch.bfloat16)
    vals, ids = [], []
    for s in range(0, vectors.shape[0], chunk):
        x = torch.nn.functional.normalize(vectors[s:s + chunk].float(), dim=-1)
        if exact:
            top = (x @ v.T).topk(k, dim=-1)
            vals.append(top.values)
            ids.append(top.indices)
            continue
        cand = (x.to(torch.bfloat16) @ v_low.T).topk(n_cand, dim=-1).indices  # [r, C]
        rescored = torch.einsum("rd,rcd->rc", x, v[cand])  # exact float32 cosines of the candidates
        top = rescored.topk(k, dim=-1)
        vals.append(top.values)
        ids.append(torch.gather(cand, 1, top.indices))
    values, index = torch.cat(vals), torch.cat(ids)
    if allowed is not None:
        index = ids_allowed[index]
    return values, index


def word_token(tokenizer, word: str, strict: bool = False) -> tuple[int, str]:
    """The single token id for ``word``; if it splits, the first piece (with a warning) or an error if strict."""
    pieces = tokenizer.tokenize(" " + word if _byte_level(tokenizer) else word)
    if not pieces:
        raise InputError(f"the tokenizer produces no token for {word!r}")
    unk = getattr(tokenizer, "unk_token", None)
    if unk is not None and unk in pieces:
        msg = f"{word!r} is not in the vocabulary (the tokenizer maps it to {unk})"
        if strict:
            raise InputError(msg + "; choose words the vocabulary knows")
        warnings.warn(msg + f"; using {pieces[0]!r}", stacklevel=2)
    if len(pieces) > 1:
        msg = f"{word!r} splits into {pieces}; using the first piece {pieces[0]!r}"
        if strict:
            raise InputError(msg + " is refused under --strict; choose words that are single tokens")
        warnings.warn(msg, stacklevel=2)
    return tokenizer.convert_tokens_to_ids(pieces[0]), pieces[0]


def _byte_level(tokenizer) -> bool:
    """Byte-level BPE (GPT-2, RoBERTa, Pythia): a word inside a sentence is its space-prefixed 'Ġword' token."""
    try:
        pieces = tokenizer.tokenize(" the")
    except Exception:
        return False
    return bool(pieces) and pieces[0].startswith("\u0120")


def parse_range(spec: str | None, upper: int, what: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; None/'all' -> all; out-of-range -> InputError."""
    if spec in (None, "", "all"):
        return list(range(upper))
    out = []
    for part in spec.split(","):
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-"))
                if b < a:
                    raise InputError(f"{what} range {part!r} runs backwards; write it low-high, e.g. {b}-{a}")
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InputError(f"cannot read {what} {spec!r}; use e.g. '0-3,7'") from None
    if not out:
        raise InputError(f"{what} {spec!r} names nothing; use e.g. '0-3,7' or 'all'")
    bad = [i for i in out if not 0 <= i < upper]
    if bad:
        raise InputError(f"{what} {bad} out of range: the model has {upper} {what} (0..{upper - 1})")
    return sorted(set(out))


def high_bias_mask(ids: torch.Tensor, vocab_size: int, share: float = 0.5) -> torch.Tensor:
    """Tokens that appear in more than ``share`` of the top-k lists ``ids [R, k]`` (ids within a row are distinct)."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size)
    return counts > share * ids.shape[0]
