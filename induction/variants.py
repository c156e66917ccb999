"""Repeated-random-token (RRT) variants, registered by name.

A variant is one small definition: given a protocol, a number of trials, the length n of the random
block and a generator, it returns an :class:`RRTBatch` - token ids, the [MASK] position of each trial and
its named target positions. Register your own with :func:`register_variant` (see README); nothing in the
core needs editing.

All index arithmetic uses 0-based positions in the framed sequence (protocol tokens included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from attnlab.core.errors import InputError
from attnlab.induction.protocols import Protocol


@dataclass
class RRTBatch:
    """One variant's trials.

    input_ids     [T, S]  with the [MASK] already in place
    mask_index    [T]     position of [MASK] (the query)
    masked_token  [T]     the id that was replaced by [MASK]
    targets       name -> [T] key positions whose attention from the query is scored
    """

    input_ids: torch.Tensor
    mask_index: torch.Tensor
    masked_token: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def masked(cls, ids: torch.Tensor, mask_index: torch.Tensor, mask_id: int, targets: dict) -> "RRTBatch":
        """Put [MASK] at ``mask_index`` of each row of ``ids`` (a copy) and record what it replaced."""
        ids = ids.clone()
        rows = torch.arange(ids.shape[0])
        masked_token = ids[rows, mask_index].clone()
        ids[rows, mask_index] = mask_id
        seq = ids.shape[1]
        # negative indices (paper quirks) index from the end, as Python/NumPy indexing did in the paper's code
        targets = {name: torch.as_tensor(pos, dtype=torch.long) % seq for name, pos in targets.items()}
        return cls(ids, mask_index, masked_token, targets)


@dataclass(frozen=True)
class Variant:
    name: str
    targets: tuple[str, ...]
    build: Callable[[Protocol, int, int, torch.Generator], RRTBatch]
    description: str = ""
    default_n: dict = field(default_factory=dict)  # protocol name -> default n (e.g. triple uses 150 in paper)

    def n_for(self, protocol: str, n: int | None) -> int:
        return n if n is not None else self.default_n.get(protocol, 200)


_REGISTRY: dict[str, Variant] = {}


def register_variant(name: str, targets, description: str = "", default_n: dict | None = None):
    """Decorator: register ``build(protocol, n_trials, n, generator) -> RRTBatch`` as variant ``name``."""

    def wrap(build):
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is already registered")
        _REGISTRY[name] = Variant(name, tuple(targets), build, description or (build.__doc__ or "").strip(),
                                  dict(default_n or {}))
        return build

    return wrap


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown variant {name!r}; known variants: {', '.join(sorted(_REGISTRY))}") from None


def list_variants() -> list[Variant]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _randint(generator, low, high, n_trials):
    """Uniform integers in [low, high] (inclusive), one per trial."""
    return torch.randint(low, high + 1, (n_trials,), generator=generator)


def _first_occurrence(ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row, the first position holding ``tokens[row]`` (the paper's ``list.index``)."""
    hits = ids == tokens[:, None]
    return hits.float().argmax(dim=1)


@register_variant(
    "standard", ["prev", "before", "after"],
    "X then X; mask one token of the second copy. prev = its position in the first copy; before/after = prev -/+ 1.",
)
def build_standard(protocol: Protocol, n_trials: int, n: int, g: torch.Generator) -> RRTBatch:
    x = protocol.draw(n_trials, n, g)
    ids, off = protocol.frame(torch.cat([x, x], dim=1))
    if protocol.name == "paper":
        # Paper: masked index n + r, r in [0, n-1]. With the single leading [SEP] this is token r-1 of the second
        # copy, so prev = r. Quirk: r = 0 masks the LAST token of the FIRST copy, and then prev = 0 ([SEP]) and
        # before = -1 (the last position of the sequence).
        r = _randint(g, 0, n - 1, n_trials)
        mask_index, prev = n + r, r
    else:
        j = _randint(g, 1, n - 2, n_trials)  # never a copy's first or last token
        mask_index = off + n + j
        prev = off + j
    return RRTBatch.masked(ids, mask_index, protocol.mask_id, {"prev": prev, "before": prev - 1, "after": prev + 1})


@register_variant(
    "shuffled", ["after_prev_of_left", "before_prev_of_right"],
    "X then a permutation of X; mask one token of the second part. after_prev_of_left = (first-copy position of "
    "the left neighbour's token) + 1; before_prev_of_right = (first-copy position of the right neighbour's token) - 1.",
)
def build_shuffled(protocol: Protocol, n_trials: int, n: int, g: torch.Generator) -> RRTBatch:
    x = protocol.draw(n_trials, n, g)
    perm = torch.argsort(torch.rand(n_trials, n, generator=g), dim=1)
    ids, off = protocol.frame(torch.cat([x, torch.gather(x, 1, perm)], dim=1))
    if protocol.name == "paper":
        # Paper: masked index n + r + 1 (token r of the shuffled part) and the FIRST occurrence of each neighbour
        # token in the whole sequence. Quirks: r = 0 makes the left neighbour the last token of the first copy;
        # repeated ids (drawn with replacement) resolve to their first occurrence. Deviation: r is drawn in
        # [0, n-2] rather than [0, n-1], because r = n-1 would put the right neighbour past the end.
        r = _randint(g, 0, n - 2, n_trials)
        mask_index = n + r + 1
    else:
        mask_index = off + n + _randint(g, 1, n - 2, n_trials)
    rows = torch.arange(n_trials)
    left = _first_occurrence(ids, ids[rows, mask_index - 1])
    right = _first_occurrence(ids, ids[rows, mask_index + 1])
    return RRTBatch.masked(ids, mask_index, protocol.mask_id,
                           {"after_prev_of_left": left + 1, "before_prev_of_right": right - 1})


@register_variant(
    "triple", ["prev", "next"],
    "X, X, X (bidirectional); mask one token of the middle copy. prev = its position in the first copy, "
    "next = in the third.",
    default_n={"paper": 150, "clean": 150},
)
def build_triple(protocol: Protocol, n_trials: int, n: int, g: torch.Generator) -> RRTBatch:
    x = protocol.draw(n_trials, n, g)
    ids, off = protocol.frame(torch.cat([x, x, x], dim=1))
    if protocol.name == "paper":
        # Paper: masked index n + r as in `standard`, so r = 0 masks the last token of the first copy (prev = 0).
        r = _randint(g, 0, n - 1, n_trials)
        mask_index = n + r
    else:
        mask_index = off + n + _randint(g, 1, n - 2, n_trials)
    return RRTBatch.masked(ids, mask_index, protocol.mask_id, {"prev": mask_index - n, "next": mask_index + n})


def build_batch(variant: Variant, protocol: Protocol, n_trials: int, n: int, seed: int,
                max_positions: int | None = None) -> RRTBatch:
    """Build ``n_trials`` trials of ``variant`` with a fresh generator seeded by ``seed``."""
    if n_trials < 1:
        raise InputError(f"--trials must be at least 1, got {n_trials}")
    if n < 3:
        raise InputError(f"--seq-len must be at least 3 (a masked token needs both neighbours), got {n}")
    batch = variant.build(protocol, n_trials, n, torch.Generator().manual_seed(seed))
    seq = batch.input_ids.shape[1]
    if max_positions is not None and seq > max_positions:
        longest_n = max(
            (m for m in range(3, n) if variant.build(protocol, 1, m, torch.Generator().manual_seed(0)).input_ids.shape[1]
             <= max_positions), default=None)
        raise InputError(
            f"variant {variant.name!r} with --seq-len {n} builds {seq}-token sequences, longer than the model's "
            f"{max_positions} positions; lower --seq-len to at most {longest_n}"
        )
    return batch
