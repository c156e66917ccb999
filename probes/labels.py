"""Where a probe's labels come from, and how words meet sub-word tokens.

A :class:`Sentence` is a list of words, each with a label and a type (its lowercased form: what the control task
keys on). CoNLL-U files are parsed by the ``conllu`` package as Universal Dependencies specifies them: a multi-word
token (id ``3-4``) is one surface form whose syntactic words (3 and 4) share its sub-word tokens; an empty node
(id ``5.1``) has no surface form and is skipped. Builtin tasks compute labels from plain text.

Alignment (``align``): the sentence's surface forms go through the model's tokenizer as pre-split words; a word is
represented by its first sub-word token (default) or the mean of its tokens (``pool="mean"``). Units beyond the
model's positions are never truncated: such sentences are dropped and counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from attnlab.core.errors import InputError


@dataclass
class Sentence:
    surface: list[str]  # the surface forms, in order (what the tokenizer sees)
    units: list[tuple[int, str, str]] = field(default_factory=list)  # (surface index, label, type) per probed word


# ---------------------------------------------------------------- CoNLL-U


def _check_lines(text: str, path: str) -> None:
    """A one-line error naming the first line that is not CoNLL-U (10 tab-separated fields, an integer, range or
    decimal id)."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise InputError(f"{path}, line {number}: expected 10 tab-separated fields (CoNLL-U), got {len(fields)}; "
                             "fix the file")
        if not re.fullmatch(r"\d+|\d+-\d+|\d+\.\d+", fields[0]):
            raise InputError(f"{path}, line {number}: the id {fields[0]!r} is not an integer, a range (3-4) or a "
                             "decimal (5.1); fix the file")


def _head_distance(word) -> str:
    head = word["head"]
    if head in (None, "_"):
        return "none"
    d = abs(int(head) - int(word["id"])) if int(head) else 0
    return "root" if d == 0 else "1" if d == 1 else "2" if d == 2 else "3-4" if d <= 4 else "5-8" if d <= 8 else "9+"


def conllu_sentences(path: str, task: str) -> list[Sentence]:
    """The sentences of a CoNLL-U file with ``task``'s label on every syntactic word."""
    import conllu

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read CoNLL-U file {path}: {exc}") from None
    _check_lines(text, path)
    try:
        parsed = conllu.parse(text)
    except Exception as exc:  # the parser's own errors: a malformed field
        raise InputError(f"{path} is not valid CoNLL-U: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    out = []
    for tokens in parsed:
        sentence, surface_of = Sentence([]), {}  # syntactic word id -> index of its surface form
        for tok in tokens:  # file order is text order: a range line comes just before its words
            tid = tok["id"]
            if isinstance(tid, tuple):
                if tid[1] == "-":  # a multi-word token: one surface form for the words it spans
                    for w in range(tid[0], tid[2] + 1):
                        surface_of[w] = len(sentence.surface)
                    sentence.surface.append(tok["form"])
                continue  # an empty node (5.1): no surface form
            if tid not in surface_of:
                surface_of[tid] = len(sentence.surface)
                sentence.surface.append(tok["form"])
            label = _head_distance(tok) if task == "head-distance" else tok[task]
            if label not in (None, "_"):
                sentence.units.append((surface_of[tid], str(label), str(tok["form"]).lower()))
        out.append(sentence)
    if not out:
        raise InputError(f"{path} holds no sentence")
    return out


# ---------------------------------------------------------------- builtin tasks on plain text

WORD = re.compile(r"\w+|[^\w\s]")


def _bucket_position(i: int) -> str:
    return "0" if i == 0 else "1-2" if i <= 2 else "3-5" if i <= 5 else "6-10" if i <= 10 else "11+"


def builtin_sentences(docs, task: str, limit: int, tokenizer) -> list[Sentence]:
    """Sentences of the corpus with labels computed from the text alone (``initial`` labels every sub-word token,
    the others every word)."""
    from attnlab.geometry.qk import split_sentences

    sentences = []
    for doc in docs:
        for text in split_sentences(doc.text):
            words = WORD.findall(text)
            if len(words) >= 3:
                sentences.append(words)
            if len(sentences) >= limit:
                break
        if len(sentences) >= limit:
            break
    if len(sentences) < 2:
        raise InputError("the corpus gives fewer than two sentences; use a larger corpus")
    counts = Counter(w.lower() for s in sentences for w in s)
    ranked = sorted(counts.values(), reverse=True)
    cuts = [ranked[int(len(ranked) * q)] for q in (0.01, 0.1, 0.5)]  # frequency buckets by rank among word types

    def frequency(word: str) -> str:
        c = counts[word.lower()]
        return "top1%" if c >= cuts[0] else "top10%" if c >= cuts[1] else "top50%" if c >= cuts[2] else "rare"

    out = []
    for words in sentences:
        s = Sentence(list(words))
        for i, w in enumerate(words):
            if task == "capitalised":
                label = "yes" if w[0].isupper() else "no"
            elif task == "numeric":
                label = "yes" if any(ch.isdigit() for ch in w) else "no"
            elif task == "punctuation":
                label = "yes" if not any(ch.isalnum() for ch in w) else "no"
            elif task == "position":
                label = _bucket_position(i)
            elif task == "frequency":
                label = frequency(w)
            else:  # initial: every sub-word token of the word is a unit (see align)
                label = "word"
            s.units.append((i, label, w.lower()))
        out.append(s)
    return out


# ---------------------------------------------------------------- alignment


@dataclass
class Aligned:
    """Sentences as token ids, and per probed unit: its sentence, the token positions it pools, label and type."""

    ids: list[list[int]]
    units: list[tuple[int, list[int], str, str]]  # (sentence, token positions, label, type)
    dropped_long: int
    dropped_budget: int
    tokens: int


def align(sentences: list[Sentence], tokenizer, max_positions: int, max_units: int, pool: str,
          subword_task: bool = False) -> Aligned:
    """Tokenise each sentence's surface forms as pre-split words (a fast tokenizer's ``word_ids``) and point every
    unit at its tokens: the first (``pool="first"``) or all of them (``"mean"``); with ``subword_task`` every token
    of a word is its own unit, labelled ``initial`` or ``continuation``."""
    ids_out, units, dropped_long, dropped_budget, tokens = [], [], 0, 0, 0
    for sentence in sentences:
        enc = tokenizer(sentence.surface, is_split_into_words=True, add_special_tokens=True, truncation=False)
        ids = enc["input_ids"]
        if len(ids) > max_positions:
            dropped_long += 1
            continue
        if len(units) >= max_units:
            dropped_budget += 1
            continue
        word_ids = enc.word_ids()
        positions: dict[int, list[int]] = {}
        for p, w in enumerate(word_ids):
            if w is not None:
                positions.setdefault(w, []).append(p)
        k = len(ids_out)
        for index, label, typ in sentence.units:
            where = positions.get(index)
            if not where:
                continue
            if subword_task:
                for j, p in enumerate(where):
                    units.append((k, [p], "initial" if j == 0 else "continuation",
                                  tokenizer.convert_ids_to_tokens([ids[p]])[0].lower()))
            else:
                units.append((k, where[:1] if pool == "first" else where, label, typ))
        ids_out.append(ids)
        tokens += len(ids)
    if not units:
        raise InputError("no word could be aligned to the model's tokens (every sentence longer than the model, or "
                         "no label); check the labels source")
    return Aligned(ids_out, units, dropped_long, dropped_budget, tokens)
