"""Token protocols: which ids random sequences are made of, and how they are framed.

``paper`` replicates the paper's code; ``clean`` (default) makes every target well defined.

``paper`` quirks replicated on purpose (variants document their own index quirks):
  * one [SEP] (id 102) in front, no [CLS], no final [SEP];
  * token ids uniform in [100, 20000) *with replacement*: a sequence can repeat a token, and can contain
    special ids that fall in that range (101 [CLS], 102 [SEP], 103 [MASK]) and [unused] entries;
  * target indices that come out negative index from the end, as Python/NumPy indexing did in that code.

``clean``: ``[CLS] ... [SEP]``; tokens drawn without replacement from ordinary vocabulary entries (no special
and no ``[unused]`` tokens), so each token occurs once per copy and "the previous instance" is unique. With
``end_sep=False`` the final [SEP] is left out (``[CLS] ...``): for a masked LM trained without an end marker, to
which a [SEP] it never saw is out of distribution (the masked organism trained here, at step 4,200, puts 0.68 of
the [MASK]'s attention on the previous instance without the [SEP] and 0.40 with it; 50 trials, n = 30).
For causal models (decoders: no [MASK], no [SEP]) ``clean`` frames ``BOS ...`` when the tokenizer has a
beginning-of-sequence token (GPT-2's ``<|endoftext|>``, Llama's ``<s>``), else the bare tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from attnlab.core.errors import InputError
from attnlab.induction.experiment import PROTOCOLS  # noqa: F401  (the config's choices; defined torch-free there)

PAPER_LOW, PAPER_HIGH = 100, 20000  # token id range of the paper's code (high exclusive)
PAPER_SEP, PAPER_MASK = 102, 103


@dataclass(frozen=True)
class TokenSpec:
    """Special ids and the pool of ordinary ids a model's vocabulary offers."""

    cls_id: int | None
    sep_id: int | None
    mask_id: int | None
    ordinary_ids: torch.Tensor  # 1-D, sorted
    vocab_size: int
    causal: bool = False  # a decoder: sequences are read left to right, nothing is masked
    bos_id: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, causal: bool = False) -> "TokenSpec":
        special = set(tokenizer.all_special_ids)
        unused = re.compile(r"^\[unused\d+\]$|^<unused\d+>$")
        vocab = tokenizer.get_vocab()
        ordinary = sorted(i for tok, i in vocab.items() if i < vocab_size and i not in special and not unused.match(tok))
        return cls(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
                   torch.tensor(ordinary, dtype=torch.long), vocab_size, causal, tokenizer.bos_token_id)

    @classmethod
    def causal_from_config(cls, config, vocab_size: int) -> "TokenSpec":
        """A decoder without tokenizer files: every id but the config's BOS / EOS / PAD is ordinary."""
        special = {getattr(config, f"{k}_token_id", None) for k in ("bos", "eos", "pad")} - {None}
        ordinary = [i for i in range(vocab_size) if i not in special]
        return cls(None, None, None, torch.tensor(ordinary, dtype=torch.long), vocab_size, True,
                   getattr(config, "bos_token_id", None))

    @classmethod
    def bert_uncased_layout(cls, vocab_size: int) -> "TokenSpec":
        """bert-base-uncased's id layout: 0 [PAD], 1-99 & 104-998 [unused], 100-103 [UNK]/[CLS]/[SEP]/[MASK]."""
        return cls(101, 102, 103, torch.arange(999, vocab_size), vocab_size)


class Protocol:
    """Frames random token sequences; variants call ``draw`` and ``frame`` and read ``name`` and ``causal``."""

    name: str

    def __init__(self, spec: TokenSpec, end_sep: bool = True):
        self.spec = spec
        self.end_sep = end_sep

    @property
    def causal(self) -> bool:
        """True for decoders: no [MASK]; the query is a token of the second copy, read left to right."""
        return self.spec.causal

    @property
    def mask_id(self) -> int:
        return self.spec.mask_id

    def draw(self, n_trials: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n_trials, n]`` random token ids."""
        raise NotImplementedError

    def frame(self, body: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Add the protocol's special tokens around ``body [T, S]``; return (ids, offset of body)."""
        raise NotImplementedError

    @property
    def offset(self) -> int:
        """Where the body starts in a framed sequence (the number of leading special tokens)."""
        return self.frame(torch.zeros(1, 0, dtype=torch.long))[1]

    def pool(self) -> torch.Tensor:
        """The ids random tokens are drawn from (1-D, sorted)."""
        return self.spec.ordinary_ids

    def draw_avoiding(self, avoid: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """``[T, count]`` distinct ids from :meth:`pool`, none of them in the same row of ``avoid`` ``[T, S]``:
        fresh tokens for the control sequences of the empirical null (a random permutation of the pool per
        trial with the avoided ids pushed to the end; 256 trials at a time)."""
        pool = self.pool()
        out = []
        for s in range(0, avoid.shape[0], 256):
            rows = avoid[s:s + 256]
            keys = torch.rand(len(rows), len(pool), generator=generator)
            where = torch.searchsorted(pool, rows).clamp_max(len(pool) - 1)
            present = pool[where] == rows
            row_of = torch.arange(len(rows))[:, None].expand_as(rows)
            keys[row_of[present], where[present]] = 2.0  # after every free id in the permutation
            free = (keys < 2).sum(1)
            if (free < count).any():
                raise InputError(f"cannot draw {count} fresh tokens for the null: only {int(free.min())} ordinary "
                                 f"vocabulary entries are left after the {rows.shape[1]} tokens of a sequence")
            out.append(pool[torch.argsort(keys, dim=1)[:, :count]])
        return torch.cat(out)


class PaperProtocol(Protocol):
    name = "paper"

    def __init__(self, spec: TokenSpec, end_sep: bool = True):
        super().__init__(spec)
        if not end_sep:
            raise InputError("protocol 'paper' has no final [SEP] to leave out (its [SEP] leads the sequence); "
                             "end_sep=False applies to protocol 'clean'")
        if spec.causal:
            raise InputError("protocol 'paper' replicates the paper's BERT code ([SEP] and [MASK] ids); a causal model "
                             "has neither - use protocol 'clean'")
        if spec.vocab_size < PAPER_HIGH:
            raise InputError(
                f"protocol 'paper' draws token ids in [{PAPER_LOW}, {PAPER_HIGH}) but the model's vocabulary has "
                f"only {spec.vocab_size} entries; use --protocol clean"
            )
        if spec.sep_id not in (None, PAPER_SEP) or spec.mask_id not in (None, PAPER_MASK):
            raise InputError(
                f"protocol 'paper' hard-codes [SEP]={PAPER_SEP} and [MASK]={PAPER_MASK} (bert-base-uncased's ids) but "
                f"this tokenizer has [SEP]={spec.sep_id}, [MASK]={spec.mask_id}; use --protocol clean"
            )

    @property
    def mask_id(self) -> int:
        return PAPER_MASK

    def draw(self, n_trials, n, generator):
        return torch.randint(PAPER_LOW, PAPER_HIGH, (n_trials, n), generator=generator)

    def pool(self) -> torch.Tensor:
        """The paper's id range without its three special ids: fresh null tokens are ordinary ones."""
        ids = torch.arange(PAPER_LOW, PAPER_HIGH)
        return ids[~torch.isin(ids, torch.tensor([101, PAPER_SEP, PAPER_MASK]))]

    def frame(self, body):
        sep = torch.full((body.shape[0], 1), PAPER_SEP, dtype=torch.long)
        return torch.cat([sep, body], dim=1), 1


class CleanProtocol(Protocol):
    name = "clean"

    def __init__(self, spec: TokenSpec, end_sep: bool = True):
        super().__init__(spec, end_sep)
        if spec.causal:
            return
        needed = [("[CLS]", spec.cls_id), *([("[SEP]", spec.sep_id)] if end_sep else []), ("[MASK]", spec.mask_id)]
        missing = [n for n, v in needed if v is None]
        if missing:
            raise InputError(f"protocol 'clean' needs {', '.join(missing)} token(s), which this model's tokenizer lacks")

    def draw(self, n_trials, n, generator):
        pool = self.spec.ordinary_ids
        if n > len(pool):
            raise InputError(f"cannot draw {n} distinct tokens from {len(pool)} ordinary vocabulary entries")
        # without replacement: the first n of a random permutation, per trial; 256 trials at a time so that
        # the [trials, vocabulary] random keys never take more than a few tens of MB
        picks = [torch.argsort(torch.rand(min(256, n_trials - s), len(pool), generator=generator), dim=1)[:, :n]
                 for s in range(0, n_trials, 256)]
        return pool[torch.cat(picks)]

    def frame(self, body):
        t = body.shape[0]
        if self.causal:  # BOS X X, or X X when the tokenizer has no BOS
            if self.spec.bos_id is None:
                return body, 0
            return torch.cat([torch.full((t, 1), self.spec.bos_id, dtype=torch.long), body], dim=1), 1
        cls = torch.full((t, 1), self.spec.cls_id, dtype=torch.long)
        if not self.end_sep:  # [CLS] X X
            return torch.cat([cls, body], dim=1), 1
        sep = torch.full((t, 1), self.spec.sep_id, dtype=torch.long)
        return torch.cat([cls, body, sep], dim=1), 1


def make_protocol(name: str, spec: TokenSpec, end_sep: bool = True) -> Protocol:
    """The protocol ``name`` for a model with tokens ``spec``; ``end_sep=False``: masked sequences end without the
    final [SEP] (``clean`` only; decoders have none either way)."""
    if name == "paper":
        return PaperProtocol(spec, end_sep)
    if name == "clean":
        return CleanProtocol(spec, end_sep)
    raise InputError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")


def token_spec_for(lm) -> TokenSpec:
    """The model's TokenSpec: from its tokenizer, else (decoders) the config's special ids, else
    bert-base-uncased's id layout."""
    if lm.tokenizer is not None:
        return TokenSpec.from_tokenizer(lm.tokenizer, lm.vocab_size, causal=lm.is_causal)
    if lm.is_causal:
        return TokenSpec.causal_from_config(lm.config, lm.vocab_size)
    if lm.vocab_size <= PAPER_HIGH:
        raise InputError(f"model '{lm.name}' has no tokenizer files and its {lm.vocab_size}-entry vocabulary is not "
                         "bert-base-uncased's id layout, so special and ordinary ids are unknown; save the tokenizer "
                         "beside the model (tokenizer.save_pretrained(folder))")
    return TokenSpec.bert_uncased_layout(lm.vocab_size)
