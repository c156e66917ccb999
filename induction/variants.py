"""Repeated-random-token (RRT) variants, registered by name.

A variant is one small definition: given a protocol, a number of trials, the length n of the random
block and a generator, it returns an :class:`RRTBatch` - token ids, the query position of each trial (the
[MASK] for masked LMs) and its named target positions. Variants declare the models they serve
(``modes``): ``"masked"`` (a [MASK] query, context on both sides) and/or ``"causal"`` (decoders: the query
is an unmasked token of a later copy, and only earlier keys exist - Olsson et al.'s prefix matching). A
builder that serves both reads ``protocol.causal``. Register your own with :func:`register_variant` (see README); nothing in the
core needs editing.

Every variant also has a **null**: control sequences with the same length, special tokens, query and target
positions, but no repeat - the copies that the query could read are replaced by fresh random tokens (a
builder's ``null`` hook says which; by default every token but the special ones and the query). Attention
to a target on them is what the same positions get when there is nothing to find (:func:`build_null`).

All index arithmetic uses 0-based positions in the framed sequence (protocol tokens included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from attnlab.core.errors import InputError
from attnlab.induction.protocols import Protocol


@dataclass
class RRTBatch:
    """One variant's trials.

    input_ids     [T, S]  with the [MASK] already in place (causal: unchanged)
    mask_index    [T]     position of the query ([MASK]; causal: a token of a later copy)
    masked_token  [T]     the id that was replaced by [MASK] (causal: the query's own token)
    targets       name -> [T] key positions whose attention from the query is scored
    """

    input_ids: torch.Tensor
    mask_index: torch.Tensor
    masked_token: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    #: optional [T] bool: trials hit by a documented protocol quirk (the paper protocol's r = 0 trials)
    quirk: torch.Tensor | None = None

    @classmethod
    def masked(cls, ids: torch.Tensor, mask_index: torch.Tensor, mask_id: int, targets: dict,
               quirk: torch.Tensor | None = None) -> "RRTBatch":
        """Put [MASK] at ``mask_index`` of each row of ``ids`` (a copy) and record what it replaced.

        Target positions must be integers; negative ones count from the end (as Python/NumPy indexing did
        in the paper's code, whose quirks the ``paper`` protocol keeps), anything else outside the sequence
        is an error (:func:`check_batch`).
        """
        if mask_id is None:
            raise InputError("this protocol has no [MASK] token (a causal model); a builder for causal models "
                             "returns RRTBatch.causal(...) when protocol.causal is true")
        ids = ids.clone()
        rows = torch.arange(ids.shape[0])
        mask_index = _integer_positions(mask_index, "mask_index")
        if mask_index.shape != rows.shape or ((mask_index < 0) | (mask_index >= ids.shape[1])).any():
            raise InputError(f"mask_index must hold one position per trial inside the {ids.shape[1]}-token "
                             f"sequences, got {mask_index.tolist()[:5]}...; fix the builder's index arithmetic")
        masked_token = ids[rows, mask_index].clone()
        ids[rows, mask_index] = mask_id
        seq = ids.shape[1]
        targets = {name: _integer_positions(pos, f"target {name!r}") for name, pos in targets.items()}
        targets = {name: torch.where((pos < 0) & (pos >= -seq), pos + seq, pos) for name, pos in targets.items()}
        return cls(ids, mask_index, masked_token, targets, quirk)


    @classmethod
    def causal(cls, ids: torch.Tensor, query_index, targets: dict, quirk: torch.Tensor | None = None) -> "RRTBatch":
        """For decoders: nothing is masked; ``query_index`` is the token whose attention row is read.
        Targets must lie at or before the query (a causal model cannot attend to later keys)."""
        query_index = _integer_positions(query_index, "query_index")
        rows = torch.arange(ids.shape[0])
        if query_index.shape != rows.shape or ((query_index < 0) | (query_index >= ids.shape[1])).any():
            raise InputError(f"query_index must hold one position per trial inside the {ids.shape[1]}-token "
                             f"sequences, got {query_index.tolist()[:5]}...; fix the builder's index arithmetic")
        targets = {name: _integer_positions(pos, f"target {name!r}") for name, pos in targets.items()}
        for name, pos in targets.items():
            if pos.shape == query_index.shape and (pos > query_index).any():
                raise InputError(f"target {name!r} lies after the query in a causal model, which cannot attend "
                                 "to later tokens; fix the builder's index arithmetic")
        return cls(ids.clone(), query_index, ids[rows, query_index].clone(), targets, quirk)


def _integer_positions(pos, what: str) -> torch.Tensor:
    """Positions as a long tensor; floats are refused rather than truncated."""
    t = torch.as_tensor(pos)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} positions must be integers, got dtype {t.dtype}; positions are token indices")
    return t.long()


def check_batch(batch, variant: str, n_trials: int) -> RRTBatch:
    """Reject what a (plugin) builder got wrong, with the variant's name, before any forward pass."""
    where = f"variant {variant!r} builder"
    if not isinstance(batch, RRTBatch):
        raise InputError(f"{where} returned {type(batch).__name__}, not an RRTBatch; return RRTBatch.masked(...)")
    ids = batch.input_ids
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != n_trials or ids.is_floating_point():
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"{where} returned input_ids of shape {shape}; expected integer ids [{n_trials}, seq]")
    seq = ids.shape[1]
    named = {"mask_index": batch.mask_index, **{f"target {k!r}": v for k, v in batch.targets.items()}}
    if not batch.targets:
        raise InputError(f"{where} returned no targets; name at least one target position per trial")
    for what, pos in named.items():
        if not isinstance(pos, torch.Tensor) or pos.shape != (n_trials,):
            shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise InputError(f"{where}: {what} has shape {shape}; expected one position per trial [{n_trials}]")
        if pos.is_floating_point():
            raise InputError(f"{where}: {what} positions must be integers, got dtype {pos.dtype}")
        if ((pos < 0) | (pos >= seq)).any():
            bad = int(pos[(pos < 0) | (pos >= seq)][0])
            raise InputError(f"{where}: {what} position {bad} lies outside the {seq}-token sequence "
                             f"(positions 0..{seq - 1}); fix the builder's index arithmetic")
    return batch


@dataclass(frozen=True)
class Variant:
    name: str
    targets: tuple[str, ...]
    build: Callable[[Protocol, int, int, torch.Generator], RRTBatch]
    description: str = ""
    default_n: dict = field(default_factory=dict)  # protocol name -> default n (e.g. triple uses 150 in paper)
    modes: tuple[str, ...] = ("masked",)  # "masked" (a [MASK] query) and/or "causal" (decoders)
    #: null(protocol, batch, n, generator) -> [T, S] control ids (see the module doc); None: the default null
    null: Callable | None = None

    def check_model(self, lm) -> None:
        """A clear error when this variant cannot serve ``lm`` (e.g. it needs a [MASK] and ``lm`` is causal)."""
        mode = "causal" if lm.is_causal else "masked"
        if mode not in self.modes:
            need = ("a [MASK] token and context on both sides (a masked LM)" if mode == "causal"
                    else "a causal (decoder) model")
            serving = [v.name for v in list_variants() if mode in v.modes]
            raise InputError(f"variant {self.name!r} needs {need}, but model '{lm.name}' is "
                             f"{'causal' if mode == 'causal' else 'a masked LM'}; variants for it: "
                             f"{', '.join(serving) or 'none'}")

    def n_for(self, protocol: str, n: int | None) -> int:
        return n if n is not None else self.default_n.get(protocol, 200)


_REGISTRY: dict[str, Variant] = {}


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_names(name, targets) -> None:
    """Variant and target names become file names and array keys: plain words only."""
    for what, value in [("variant name", name)] + [("target name", t) for t in targets]:
        if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
            raise InputError(f"{what} {value!r} must be 1-64 letters, digits, '_', '-' or '.', starting with a "
                             "letter or digit (it names files); rename it")
    if not targets:
        raise InputError(f"variant {name!r} names no target; give at least one")
    if len(set(targets)) != len(targets):
        raise InputError(f"variant {name!r} names a target twice: {list(targets)}")


def register_variant(name: str, targets, description: str = "", default_n: dict | None = None,
                     modes=("masked",), null=None):
    """Decorator: register ``build(protocol, n_trials, n, generator) -> RRTBatch`` as variant ``name``.

    ``modes``: the models it serves, ``("masked",)`` by default; add ``"causal"`` when the builder handles
    ``protocol.causal`` (returning :meth:`RRTBatch.causal`). ``null(protocol, batch, n, generator) -> [T, S]``
    ids: the variant's control sequences (:func:`replace_spans` helps); by default every token but the special
    ones and the query is replaced by a fresh one.

    Registering the same builder again (a plugin imported twice) replaces it; another builder under a
    taken name is an error.
    """

    def wrap(build):
        _check_names(name, tuple(targets) if not isinstance(targets, str) else (targets,))
        old = _REGISTRY.get(name)
        if old is not None and _origin(old.build) != _origin(build):
            raise InputError(f"variant {name!r} is already registered by {_origin(old.build)[0]}; give the variant "
                             f"in {_origin(build)[0]} another name")
        bad = set(modes) - {"masked", "causal"}
        if not modes or bad:
            raise InputError(f"variant {name!r}: modes must be 'masked' and/or 'causal', got {tuple(modes)!r}")
        _REGISTRY[name] = Variant(name, tuple(targets), build, description or (build.__doc__ or "").strip(),
                                  dict(default_n or {}), tuple(modes), null)
        return build

    return wrap


def _origin(build) -> tuple[str, str]:
    import inspect

    try:
        path = inspect.getsourcefile(build) or "?"
    except TypeError:
        path = "?"
    return path, getattr(build, "__qualname__", repr(build))


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown variant {name!r}{hint}; known variants: {', '.join(sorted(_REGISTRY))}") from None


def list_variants() -> list[Variant]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def replace_spans(protocol: Protocol, batch: RRTBatch, spans, generator: torch.Generator) -> torch.Tensor:
    """Control ids: ``batch``'s sequences with every position in ``spans`` (``[(start, stop)]``, 0-based, framed)
    replaced by fresh tokens that occur nowhere in the trial - except the query, which keeps its token."""
    ids = batch.input_ids
    rows = torch.arange(ids.shape[0])
    real = ids.clone()
    real[rows, batch.mask_index] = batch.masked_token  # the masked token is not fresh either
    where = torch.zeros_like(ids, dtype=torch.bool)
    for start, stop in spans:
        where[:, start:stop] = True
    where[rows, batch.mask_index] = False
    return _fill(protocol, ids, real, where, generator)


def _fill(protocol, ids, real, where, generator):
    count = int(where.sum(1).max()) if where.any() else 0
    out = ids.clone()
    if count:
        fresh = protocol.draw_avoiding(real, count, generator)
        order = (where.cumsum(1) - 1).clamp_min(0)
        out[where] = fresh.gather(1, order)[where]
    return out


def default_null(protocol: Protocol, batch: RRTBatch, n: int, generator: torch.Generator) -> torch.Tensor:
    """The null of a variant that declares none: every position but the special tokens and the query gets a fresh
    token (nothing repeats anywhere)."""
    spec = protocol.spec
    specials = torch.tensor(sorted({i for i in (spec.cls_id, spec.sep_id, spec.mask_id, spec.bos_id,
                                                protocol.mask_id if not protocol.causal else None) if i is not None}),
                            dtype=torch.long)
    ids = batch.input_ids
    rows = torch.arange(ids.shape[0])
    real = ids.clone()
    real[rows, batch.mask_index] = batch.masked_token
    where = ~torch.isin(ids, specials)
    where[rows, batch.mask_index] = False
    return _fill(protocol, ids, real, where, generator)


def build_null(variant: "Variant", protocol: Protocol, batch: RRTBatch, n: int, seed: int) -> torch.Tensor:
    """The control ids ``[T, S]`` of ``batch`` (same seed, same ids every time), checked like a builder's output."""
    g = torch.Generator().manual_seed(seed + NULL_SEED)
    try:
        null = (variant.null or default_null)(protocol, batch, n, g)
    except InputError as exc:
        raise InputError(f"variant {variant.name!r} null: {exc}") from None
    except Exception as exc:
        raise InputError(f"variant {variant.name!r} null builder failed: {type(exc).__name__}: {exc}") from None
    if (not isinstance(null, torch.Tensor) or null.shape != batch.input_ids.shape or null.is_floating_point()):
        shape = tuple(null.shape) if isinstance(null, torch.Tensor) else type(null).__name__
        raise InputError(f"variant {variant.name!r} null returned {shape}; expected integer ids of the batch's shape "
                         f"{tuple(batch.input_ids.shape)}")
    rows = torch.arange(null.shape[0])
    if not torch.equal(null[rows, batch.mask_index], batch.input_ids[rows, batch.mask_index]):
        raise InputError(f"variant {variant.name!r} null changed the query token; keep it as it is")
    return null.long()


NULL_SEED = 1_000_003  # the null's generator: seeded apart from the trials' so neither changes the other


def _randint(generator, low, high, n_trials):
    """Uniform integers in [low, high] (inclusive), one per trial."""
    return torch.randint(low, high + 1, (n_trials,), generator=generator)


def _first_occurrence(ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per row, the first position holding ``tokens[row]`` (the paper's ``list.index``)."""
    hits = ids == tokens[:, None]
    return hits.float().argmax(dim=1)


def _first_copy_null(protocol, batch, n, g):
    """X X -> Y X (Y fresh): the copy before the query is gone, the query's own copy and positions stay."""
    off = protocol.offset
    return replace_spans(protocol, batch, [(off, off + n)], g)


def _outer_copies_null(protocol, batch, n, g):
    """X X X -> Y X Z: both copies around the middle one (which holds the query) are fresh."""
    off = protocol.offset
    return replace_spans(protocol, batch, [(off, off + n), (off + 2 * n, off + 3 * n)], g)


@register_variant(
    "standard", ["prev", "before", "after"],
    "X then X; mask one token of the second copy (causal models: read one token of the second copy). "
    "prev = its position in the first copy; before/after = prev -/+ 1 (causal: after is Olsson et al.'s "
    "prefix-matching target, the token that followed the previous instance).",
    modes=("masked", "causal"), null=_first_copy_null,
)
def build_standard(protocol: Protocol, n_trials: int, n: int, g: torch.Generator) -> RRTBatch:
    x = protocol.draw(n_trials, n, g)
    ids, off = protocol.frame(torch.cat([x, x], dim=1))
    if protocol.causal:
        j = _randint(g, 1, n - 2, n_trials)  # as for masked models: never a copy's first or last token
        query, prev = off + n + j, off + j
        return RRTBatch.causal(ids, query, {"prev": prev, "before": prev - 1, "after": prev + 1},
                               torch.zeros(n_trials, dtype=torch.bool))
    if protocol.name == "paper":
        # Paper: masked index n + r, r in [0, n-1]. With the single leading [SEP] this is token r-1 of the second
        # copy, so prev = r. Quirk: r = 0 masks the LAST token of the FIRST copy, and then prev = 0 ([SEP]) and
        # before = -1 (the last position of the sequence).
        r = _randint(g, 0, n - 1, n_trials)
        mask_index, prev, quirk = n + r, r, r == 0
    else:
        j = _randint(g, 1, n - 2, n_trials)  # never a copy's first or last token
        mask_index = off + n + j
        prev, quirk = off + j, torch.zeros(n_trials, dtype=torch.bool)
    return RRTBatch.masked(ids, mask_index, protocol.mask_id, {"prev": prev, "before": prev - 1, "after": prev + 1},
                           quirk)


@register_variant(
    "shuffled", ["after_prev_of_left", "before_prev_of_right"],
    "X then a permutation of X; mask one token of the second part. after_prev_of_left = (first-copy position of "
    "the left neighbour's token) + 1; before_prev_of_right = (first-copy position of the right neighbour's token) - 1.",
    null=_first_copy_null,
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
        mask_index, quirk = n + r + 1, r == 0
    else:
        mask_index = off + n + _randint(g, 1, n - 2, n_trials)
        quirk = torch.zeros(n_trials, dtype=torch.bool)
    rows = torch.arange(n_trials)
    left = _first_occurrence(ids, ids[rows, mask_index - 1])
    right = _first_occurrence(ids, ids[rows, mask_index + 1])
    return RRTBatch.masked(ids, mask_index, protocol.mask_id,
                           {"after_prev_of_left": left + 1, "before_prev_of_right": right - 1}, quirk)


@register_variant(
    "triple", ["prev", "next"],
    "X, X, X (bidirectional); mask one token of the middle copy. prev = its position in the first copy, "
    "next = in the third.",
    default_n={"paper": 150, "clean": 150}, null=_outer_copies_null,
)
def build_triple(protocol: Protocol, n_trials: int, n: int, g: torch.Generator) -> RRTBatch:
    x = protocol.draw(n_trials, n, g)
    ids, off = protocol.frame(torch.cat([x, x, x], dim=1))
    if protocol.name == "paper":
        # Paper: masked index n + r as in `standard`, so r = 0 masks the last token of the first copy (prev = 0).
        r = _randint(g, 0, n - 1, n_trials)
        mask_index, quirk = n + r, r == 0
    else:
        mask_index = off + n + _randint(g, 1, n - 2, n_trials)
        quirk = torch.zeros(n_trials, dtype=torch.bool)
    return RRTBatch.masked(ids, mask_index, protocol.mask_id, {"prev": mask_index - n, "next": mask_index + n}, quirk)


def sequence_length(variant: Variant, protocol: Protocol, n: int) -> int:
    """Tokens per sequence that ``variant`` builds for block length ``n`` (one cheap trial)."""
    try:
        batch = variant.build(protocol, 1, n, torch.Generator().manual_seed(0))
    except InputError as exc:
        raise InputError(f"variant {variant.name!r}: {exc}") from None
    except Exception as exc:
        raise InputError(f"variant {variant.name!r} builder failed: {type(exc).__name__}: {exc}") from None
    return int(check_batch(batch, variant.name, 1).input_ids.shape[1])


def check_length(variant: Variant, protocol: Protocol, n: int, max_positions: int | None) -> int:
    """Sequence length for ``n``; a clear error (with the largest n that fits) when it exceeds the model."""
    if n < 3:
        raise InputError(f"seq_len must be at least 3 (a masked token needs both neighbours), got {n}")
    seq = sequence_length(variant, protocol, n)
    if max_positions is not None and seq > max_positions:
        lo, hi = 3, n - 1  # the largest n that fits, by bisection (the length grows with n)
        if sequence_length(variant, protocol, lo) > max_positions:
            longest = None
        else:
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if sequence_length(variant, protocol, mid) <= max_positions else (lo, mid - 1)
            longest = lo
        raise InputError(
            f"variant {variant.name!r} with seq_len {n} builds {seq}-token sequences, longer than the model's "
            f"{max_positions} positions; lower seq_len to at most {longest}"
        )
    return seq


def build_batch(variant: Variant, protocol: Protocol, n_trials: int, n: int, seed: int,
                max_positions: int | None = None) -> RRTBatch:
    """Build ``n_trials`` trials of ``variant`` with a fresh generator seeded by ``seed``.

    Lengths are checked on a one-trial probe first, so an impossible ``n`` fails before anything big is built.
    """
    if n_trials < 1:
        raise InputError(f"trials must be at least 1, got {n_trials}")
    check_length(variant, protocol, n, max_positions)
    try:
        batch = variant.build(protocol, n_trials, n, torch.Generator().manual_seed(seed))
    except InputError as exc:
        raise InputError(f"variant {variant.name!r}: {exc}") from None
    except Exception as exc:
        raise InputError(f"variant {variant.name!r} builder failed: {type(exc).__name__}: {exc}") from None
    return check_batch(batch, variant.name, n_trials)
