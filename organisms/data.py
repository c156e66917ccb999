"""The training data of a model organism: a WordPiece vocabulary trained on the corpus, and sequences that mix
the corpus's text with repeated spans of random tokens (varied lengths, gaps and offsets).

Every batch is a pure function of (seed, step): a resumed run sees exactly the batches an uninterrupted one
would, so the two end with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnlab.core.errors import InputError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, as in BERT's layout
ORDINARY = len(SPECIALS)  # random spans draw from ids ORDINARY..vocab-1
OTHER, SECOND, FIRST = 0, 1, 2  # a position's role: text (or gap), second copy of a span, first copy of a span


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path, causal: bool):
    """A lowercase WordPiece tokenizer of ``vocab_size`` entries for ``texts``, saved in ``folder`` as a
    BertTokenizerFast (for causal models [CLS] is also the BOS token). Returns the tokenizer.

    The vocabulary is chosen by counting, not by the ``tokenizers`` trainer, whose merges break ties in a hash order
    that changes from process to process (the same seed gave different vocabularies). Here: the specials, then
    every character seen as a word start and as a continuation (``x`` and ``##x``, so every word can be spelled),
    then the most frequent whole words (ties by the word itself) up to ``vocab_size``. Rarer words are split by
    WordPiece's longest-match-first into the pieces that are there."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for text in texts:
        words.update(w for w, _ in split.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    alphabet = chars + [f"##{c}" for c in chars]
    room = vocab_size - len(SPECIALS) - len(alphabet)
    if room < 0:
        raise InputError(f"the corpus has {len(chars)} distinct characters, more than a {vocab_size}-entry vocabulary "
                         "can spell; choose a larger vocab_size")
    taken = set(alphabet)
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in taken][:room]
    tokens = SPECIALS + alphabet + frequent
    folder.mkdir(parents=True, exist_ok=True)
    extra = {"bos_token": "[CLS]", "eos_token": "[SEP]"} if causal else {}
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, **extra)
    if len(tokenizer) != len(tokens):
        raise InputError(f"the tokenizer holds {len(tokenizer)} of the {len(tokens)} chosen entries; this is a bug")
    tokenizer.save_pretrained(folder)
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Every text's tokens, concatenated ``[N]`` (no special tokens)."""
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < 1000:
        raise InputError(f"the corpus gives only {len(ids)} tokens; a model organism needs at least 1,000 - pass a "
                         "larger corpus")
    return torch.tensor(ids, dtype=torch.long)


def generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The random source of one step's batch: a function of (seed, step, stream) only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 7 + stream) % (2 ** 63))


def sequence(recipe, text: torch.Tensor, vocab: int, g: torch.Generator,
             length: int | None = None, p_text: float | None = None) -> tuple[list[int], list[int]]:
    """One training sequence ``[length]`` (default ``seq_len``) starting with [CLS], built from blocks: plain text
    (``p_text``) or a random span X of ``span_min..span_max`` tokens, 0..``gap_max`` tokens of text, and X again -
    or, with probability ``p_fragment``, only a contiguous piece of X (at least ``span_min`` tokens). With
    ``sep_end`` the sequence ends in [SEP], as BERT's inputs do. Returns the ids and, per position, its role:
    :data:`SECOND` where the token is a second copy (the tokens induction can predict), :data:`FIRST` where it is a
    span's first copy (random: nothing can predict it), :data:`OTHER` elsewhere."""
    def rint(lo, hi):  # lo..hi inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    length = length or recipe.seq_len
    p_text = recipe.p_text if p_text is None else p_text
    body = length - 1 if recipe.sep_end else length
    ids, role = [2], [OTHER]
    while len(ids) < body:
        if float(torch.rand(1, generator=g)) < p_text:
            n = rint(8, 40)
            s = rint(0, len(text) - n)
            ids += text[s:s + n].tolist()
            role += [OTHER] * n
        else:
            n = rint(recipe.span_min, recipe.span_max)
            span = torch.randint(ORDINARY, vocab, (n,), generator=g).tolist()
            if recipe.p_pooled and float(torch.rand(1, generator=g)) < recipe.p_pooled:
                # each token about twice in X: "the one token of X whose duplicate is missing" names nothing, so
                # only the neighbours (a previous-token head feeding the induction head) find the masked token
                pool = span[:max(2, n // 2)]
                span = [pool[k] for k in torch.randint(0, len(pool), (n,), generator=g).tolist()]
            gap = rint(0, recipe.gap_max)
            s = rint(0, len(text) - gap)
            again = span
            if recipe.p_fragment and float(torch.rand(1, generator=g)) < recipe.p_fragment:
                # a piece of X: "the one token of X whose copy is missing" no longer names the masked token, so
                # only matching the neighbours (induction) finds it
                m = rint(min(recipe.span_min, n), n)
                a = rint(0, n - m)
                again = span[a:a + m]
            ids += span + text[s:s + gap].tolist() + again
            role += [FIRST] * n + [OTHER] * gap + [SECOND] * len(again)
    ids, role = ids[:body], role[:body]
    if recipe.sep_end:
        ids, role = ids + [SPECIALS.index("[SEP]")], role + [OTHER]
    return ids, role


def batch(recipe, text: torch.Tensor, vocab: int, seed: int, step: int,
          length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: ids ``[batch, L]`` and each position's role ``[batch, L]`` int8 (:data:`SECOND`,
    :data:`FIRST` or :data:`OTHER`, as :func:`sequence`'s). L is ``seq_len``, or with
    ``min_len`` one length per batch drawn from ``min_len..seq_len`` (``length`` fixes it), so that [SEP] is seen
    at many positions without padding."""
    g = generator(seed, step)
    if length is None and recipe.min_len:
        length = int(torch.randint(recipe.min_len, recipe.seq_len + 1, (1,), generator=g))
    p_text = 1.0 if step < recipe.text_until else None
    rows = [sequence(recipe, text, vocab, g, length, p_text) for _ in range(recipe.batch)]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.int8)


def mask_for_mlm(ids: torch.Tensor, prob: float, vocab: int, g: torch.Generator, copy: torch.Tensor | None = None,
                 copy_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: ``prob`` of the positions (never [CLS]) are predicted; of those 80% become [MASK], 10% a
    random token, 10% stay; [SEP] is never chosen. With ``copy`` (``[batch, L]``, True on second-copy tokens) and
    ``copy_prob`` > 0, second copies are masked apart: every other token of them (a random parity per row) is
    predicted with probability ``copy_prob`` and the tokens between are never predicted, so each predicted copy
    token keeps its neighbours in view. Returns (inputs, labels with -100 where nothing is predicted)."""
    chosen = torch.rand(ids.shape, generator=g) < prob
    if copy is not None and copy_prob:
        # why: with 30% masked at random, a third of the predicted copy tokens lose the neighbour that induction
        # matches on, and a single gap per copy lets "the token of X whose copy is missing" name the answer
        parity = torch.randint(0, 2, (ids.shape[0], 1), generator=g)
        every_other = (torch.arange(ids.shape[1]) + parity) % 2 == 0
        picked = every_other & (torch.rand(ids.shape, generator=g) < copy_prob)
        chosen = torch.where(copy, picked, chosen)
    chosen[:, 0] = False
    chosen[ids == SPECIALS.index("[SEP]")] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    inputs = ids.clone()
    inputs[chosen & (r < 0.8)] = SPECIALS.index("[MASK]")
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = torch.randint(ORDINARY, vocab, (int(swap.sum()),), generator=g)
    return inputs, labels


def rrt_eval(vocab: int, n: int, trials: int, seed: int, sep: bool = False) -> torch.Tensor:
    """The fixed evaluation set: [CLS] X X (then [SEP] with ``sep``) with X ``n`` distinct ordinary tokens,
    ``[trials, 2n + 1 (+ 1)]``."""
    g = torch.Generator().manual_seed(seed + 12345)
    body = torch.stack([torch.randperm(vocab - ORDINARY, generator=g)[:n] + ORDINARY for _ in range(trials)])
    ids = torch.cat([torch.full((trials, 1), 2), body, body], dim=1)
    return torch.cat([ids, torch.full((trials, 1), SPECIALS.index("[SEP]"))], dim=1) if sep else ids
