"""Every head's attention on a researcher's own text, and the head finder (the science of ``attnlab attention``).

Record: :data:`attnlab.text.experiment.ATTENTION`; figures and the interactive page: :mod:`attnlab.figures.text`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.extractor import extract_attention
from attnlab.core.outputs import atomic_path, write_csv
from attnlab.text.experiment import AttentionConfig

MARKERS = ("Ġ", "▁", "##", "Ċ")  # how tokenizers mark word starts and pieces; a token string matches without them


@dataclass
class TextAttention:
    """The full attention ``[L, H, S, S]`` of one text, its tokens, and (with a head finder) every head ranked."""

    config: AttentionConfig
    attention: np.ndarray
    tokens: list[str]
    token_ids: list[int]
    causal: bool
    finder: dict | None


    def _repr_html_(self) -> str:
        """Jupyter: per layer, the text shaded by the attention each token receives (mean over heads and queries)."""
        from attnlab.core.notebook import block, paragraph, token_strip

        received = self.attention.mean(axis=(1, 2))  # [L, S]
        parts = [paragraph("Each token shaded by the attention it receives, averaged over heads and queries.")]
        parts += [token_strip(self.tokens, received[layer], f"L{layer}") for layer in range(received.shape[0])]
        return block("attnlab attention", *parts)

def tokenize(lm, text: str) -> tuple[list[int], list[str]]:
    """The text as the model sees it: its tokenizer, its special tokens; a one-line error when it is too long."""
    if lm.tokenizer is None:
        raise InputError(f"model '{lm.name}' has no tokenizer files; save the tokenizer beside the model "
                         "(save_pretrained) to give it text")
    ids = lm.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    if len(ids) > lm.max_positions:
        raise InputError(f"the text has {len(ids)} tokens, more than the model's {lm.max_positions} positions; "
                         "give a shorter text")
    return ids, lm.tokenizer.convert_ids_to_tokens(ids)


def _plain(token: str) -> str:
    for marker in MARKERS:
        token = token.replace(marker, "")
    return token.strip().lower()


def find_token(tokens: list[str], spec: str, what: str) -> tuple[int, str]:
    """The position a head-finder argument names: an index, or the first token whose text (without the tokenizer's
    word markers, case ignored) equals ``spec``; ``(position, note)`` - the note says when there were several."""
    if spec.strip().lstrip("-").isdigit():
        i = int(spec)
        if not 0 <= i < len(tokens):
            raise InputError(f"{what} index {i} is outside the text's {len(tokens)} tokens (0..{len(tokens) - 1})")
        return i, ""
    want = _plain(spec)
    hits = [i for i, t in enumerate(tokens) if _plain(t) == want and want]
    if not hits:
        near = ", ".join(f"{i}:{t}" for i, t in enumerate(tokens[:40]))
        raise InputError(f"{what} {spec!r} is not a token of the text; its tokens are {near}"
                         + (" ..." if len(tokens) > 40 else "") + "; give one of them or an index")
    note = (f"{what} {spec!r} occurs at positions {', '.join(map(str, hits))}; the first is used (give an index to "
            "choose)") if len(hits) > 1 else ""
    return hits[0], note


def head_finder(attention: np.ndarray, tokens: list[str], source: str, target: str, causal: bool) -> dict:
    """Every head ranked by the attention from ``source`` to ``target``, with the value's rank among that query's
    keys (1 = the key it attends to most) and the share uniform attention over its visible keys would give."""
    q, note_q = find_token(tokens, source, "from")
    k, note_k = find_token(tokens, target, "to")
    if causal and k > q:
        raise InputError(f"this model is causal: the token at {q} ({tokens[q]!r}) cannot attend to a later one at {k} "
                         f"({tokens[k]!r}); choose a target before the source")
    rows = attention[:, :, q, :]  # [L, H, S]
    values = rows[:, :, k]
    ranks = (rows > values[..., None]).sum(-1) + 1
    order = np.argsort(-values, axis=None, kind="stable")
    n_heads = attention.shape[1]
    heads = [{"head": f"L{g // n_heads}H{g % n_heads}", "layer": int(g // n_heads), "head_index": int(g % n_heads),
              "value": float(values.flat[g]), "rank": int(ranks.flat[g])} for g in order]
    return {"from": source, "to": target, "from_index": q, "to_index": k, "from_token": tokens[q], "to_token": tokens[k],
            "chance": 1.0 / (q + 1 if causal else len(tokens)), "heads": heads,
            "note": " ".join(n for n in (note_q, note_k) if n)}


def compute(cfg: AttentionConfig, lm, ctx=None) -> TextAttention:
    ids, tokens = tokenize(lm, cfg.text)
    rows = extract_attention(lm, torch.tensor([ids]))
    attention = rows.attention[0].permute(1, 2, 0, 3).numpy()  # [S, L, H, S] -> [L, H, S, S]
    finder = None
    if cfg.source is not None:
        finder = head_finder(attention, tokens, cfg.source, cfg.target, lm.is_causal)
    return TextAttention(cfg, attention, tokens, ids, lm.is_causal, finder)


def save(folder, result: TextAttention, ctx=None) -> list[str]:
    with atomic_path(folder / "attention.npz") as tmp:
        np.savez_compressed(tmp, attention=result.attention.astype(np.float32), tokens=np.array(result.tokens),
                            token_ids=np.array(result.token_ids))
    out = ["attention.npz"]
    if result.finder:
        f = result.finder
        write_csv(folder / "finder.csv", ["layer", "head", "from_index", "to_index", "attention", "rank", "chance"],
                  ([h["layer"], h["head_index"], f["from_index"], f["to_index"], f"{h['value']:.6g}", h["rank"],
                    f"{f['chance']:.6g}"] for h in f["heads"]))
        out.append("finder.csv")
    return out


def summary(result: TextAttention, ctx=None) -> dict:
    layers, heads, s, _ = result.attention.shape
    out = {"n_tokens": s, "layers": layers, "heads": heads, "causal": result.causal, "tokens": result.tokens}
    if result.finder:
        f = dict(result.finder)
        f["heads"] = f["heads"][:10]
        out["finder"] = f
    return out
