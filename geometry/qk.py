"""Per-head queries and keys of every token of N corpus sentences, via the shared extractor.

Shapes (N sentences, S = longest sentence in tokens, L layers, H heads, d = d_head):
    QKSample.queries, .keys   [N, S, L, H, d]   float32, zeros beyond each sentence's length
    QKSample.lengths          [N]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import CorpusError, InputError
from attnlab.core.extractor import extract_attention, pad_sequences
from attnlab.geometry.scaling import token_mask

# a sentence ends at . ! or ? followed by white space and something that can start a sentence
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: lines first (paragraphs, list items), then sentence ends inside a line."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENTENCE_END.split(line.strip()) if s.strip())
    return out


@dataclass
class SentenceSample:
    texts: list[str]
    token_ids: list[list[int]]
    candidates: int  # usable sentences the sample was drawn from


def sample_sentences(tokenizer, docs, n: int, seed: int, min_tokens: int = 8, max_tokens: int = 64,
                     pool_factor: int = 20) -> SentenceSample:
    """``n`` whole sentences with ``min_tokens..max_tokens`` tokens (model special tokens included), drawn
    at random (seeded) from the first ``pool_factor * n`` usable sentences in corpus order."""
    if n < 1:
        raise InputError(f"--sentences must be at least 1, got {n}")
    if min_tokens < 2 or max_tokens < min_tokens:
        raise InputError(f"need 2 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    if tokenizer is None:
        raise InputError("the model has no tokenizer; pass a model folder with tokenizer files or a Hub id")
    texts, ids = [], []
    for doc in docs:
        sentences = split_sentences(doc.text)
        if not sentences:
            continue
        encoded = tokenizer(sentences, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        for text, tokens in zip(sentences, encoded):
            if min_tokens <= len(tokens) <= max_tokens:
                texts.append(text)
                ids.append(tokens)
        if len(texts) >= pool_factor * n:
            break
    if not texts:
        raise CorpusError(
            f"the corpus has no usable sentences: none has {min_tokens}..{max_tokens} tokens after splitting "
            f"{len(docs)} documents at sentence ends; use a corpus of ordinary prose or widen --min-tokens/--max-tokens"
        )
    if len(texts) < n:
        raise CorpusError(f"the corpus has only {len(texts)} usable sentences ({min_tokens}..{max_tokens} tokens); "
                          f"asked for {n} - lower --sentences or use a larger corpus")
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size=n, replace=False))
    return SentenceSample([texts[i] for i in chosen], [ids[i] for i in chosen], len(texts))


@dataclass
class QKSample:
    queries: torch.Tensor
    keys: torch.Tensor
    lengths: torch.Tensor
    causal: bool

    @property
    def n_layers(self) -> int:
        return self.queries.shape[2]

    @property
    def n_heads(self) -> int:
        return self.queries.shape[3]

    def head(self, layer: int, head: int):
        """Queries and keys of one head over every real token: ``([T, d], [T, d])``."""
        check_head(layer, head, self.n_layers, self.n_heads)
        valid = token_mask(self.lengths, self.queries.shape[1])
        return self.queries[:, :, layer, head][valid], self.keys[:, :, layer, head][valid]


def check_head(layer: int, head: int, n_layers: int, n_heads: int) -> None:
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1} (0-based)")
    if not 0 <= head < n_heads:
        raise InputError(f"head {head} is out of range: the model has heads 0..{n_heads - 1} (0-based)")


def collect_qk(lm, token_ids, *, batch_size=None, progress: bool = False) -> QKSample:
    """Queries and keys of every token of every sequence, all layers and heads, as the model computes them."""
    input_ids, mask = pad_sequences(token_ids, pad_id=0)
    none = torch.zeros(len(token_ids), 0, dtype=torch.long)  # no attention rows: only q and k are wanted
    rows = extract_attention(lm, input_ids, mask, none, return_attention=False, return_qk=True,
                             batch_size=batch_size, progress=progress)
    padding = ~mask.bool()
    rows.queries[padding] = 0  # the model computes q/k for padding too; they are not tokens of the sentence
    rows.keys[padding] = 0
    return QKSample(rows.queries, rows.keys, mask.sum(1), causal=lm.is_causal)
