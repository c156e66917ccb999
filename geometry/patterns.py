"""Pattern and message projections vs the vocabulary (the science of ``attnlab patterns``).

For each word (or each word's position in a sentence), layer and head: the top-k vocabulary tokens by cosine
similarity with the pattern p = x W_Q W_K^T (what the head looks for) and the message m = x W_V W_O (what it
writes); and the spectrum of every chosen head's W^P and W^M. Record: ``attnlab.geometry.experiment.PATTERNS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.core.activations import attention_inputs
from attnlab.core.errors import InputError
from attnlab.core.names import model_label
from attnlab.core.outputs import write_csv, write_text
from attnlab.core.weights import head_weights
from attnlab.geometry.experiment import KINDS, PatternsConfig
from attnlab.geometry.projections import (
    VocabFilter, high_bias_mask, layer_input_norm, parse_range, project, spectrum, top_k_vocab, word_token,
)

def input_vectors(lm, words, layers, sentence=None, layernorm=False, strict=False):
    """x per word and layer ``[N, len(layers), d_model]`` plus the token used for each word."""
    tok = lm.tokenizer
    used = [word_token(tok, w, strict) for w in words]
    emb = lm.base.get_input_embeddings().weight.detach().float()
    if sentence is None:
        x = emb[[i for i, _ in used]][:, None, :].expand(-1, len(layers), -1).clone()
        if layernorm:
            with torch.inference_mode():
                for j, layer in enumerate(layers):
                    norm = layer_input_norm(lm, layer)
                    if norm is not None:
                        x[:, j] = norm(x[:, j].to(lm.device)).float().cpu()
        return x, used
    ids = tok(sentence)["input_ids"]  # with the model's own special tokens ([CLS]/[SEP], <s>, BOS, or none)
    if len(ids) > lm.max_positions:
        raise InputError(f"the sentence has {len(ids)} tokens, more than the model's {lm.max_positions} positions; "
                         "use a shorter sentence")
    positions = []
    for (tid, piece), word in zip(used, words):
        if tid not in ids:
            raise InputError(f"word {word!r} (token {piece!r}) does not occur in the sentence")
        positions.append(ids.index(tid))
    acts = attention_inputs(lm, ids).cpu()  # [L, S, d]
    return acts[layers][:, positions].transpose(0, 1).contiguous(), used


def vocabulary(lm, layer, layernorm):
    emb = lm.base.get_input_embeddings().weight.detach()
    if not layernorm:
        return emb.float().cpu()
    norm = layer_input_norm(lm, layer)
    if norm is None:
        return emb.float().cpu()
    with torch.inference_mode():
        return norm(emb).float().cpu()


def compute(lm, words, layers, kinds=KINDS, top_k=15, sentence=None, layernorm=False, flt=None, strict=False,
            weights=None):
    """Rows (input, layer, head, kind, rank, token, similarity). ``weights``: head_weights(lm) on the CPU."""
    flt = flt or VocabFilter()
    w = weights if weights is not None else head_weights(lm, device="cpu")
    x, used = input_vectors(lm, words, layers, sentence, layernorm, strict)
    allowed = flt.allowed(lm.tokenizer, lm.vocab_size)
    rows = []
    for kind in kinds:
        proj = project(x, w, kind, layers)  # [N, L', H, d]
        n, nl, nh, d = proj.shape
        results = []
        # one vocabulary per layer when LayerNorm'd; else one shared
        groups = [(j, vocabulary(lm, layer, layernorm)) for j, layer in enumerate(layers)] if layernorm else \
            [(None, vocabulary(lm, layers[0], False))]
        for j, vocab in groups:
            sel = proj if j is None else proj[:, j:j + 1]
            vals, ids = top_k_vocab(sel.reshape(-1, d), vocab, top_k * (3 if flt.high_bias else 1), allowed)
            results.append((j, sel.shape, vals, ids))
        for j, shape, vals, ids in results:
            if flt.high_bias:
                bad = high_bias_mask(ids, lm.vocab_size)
                keep = ~bad[ids]
                vals = torch.stack([v[m][:top_k] for v, m in zip(vals, keep)])
                ids = torch.stack([i[m][:top_k] for i, m in zip(ids, keep)])
            vals = vals.reshape(shape[0], shape[1], nh, -1)
            ids = ids.reshape(shape[0], shape[1], nh, -1)
            tokens = lm.tokenizer.convert_ids_to_tokens(ids.flatten().tolist())
            flat = 0
            for a in range(shape[0]):
                for b in range(shape[1]):
                    layer = layers[b if j is None else j]
                    for h in range(nh):
                        for r in range(ids.shape[-1]):
                            rows.append((words[a], layer, h, kind, r + 1, tokens[flat], float(vals[a, b, h, r])))
                            flat += 1
    return rows, used


PATTERNS_HEADER = ["input", "layer", "head", "kind", "rank", "token", "similarity"]


@dataclass
class PatternsResult:
    """``rows``: (input, layer, head, kind, rank, token, similarity) for the chosen heads; ``used``: the token
    each word became, as (id, piece); ``spectra``: (layer, head, kind, effective rank, singular values)."""

    config: PatternsConfig
    rows: list
    used: list
    spectra: list


def check(cfg: PatternsConfig, lm, ctx) -> None:
    """Before any work: a tokenizer to look words up in, layers and heads that exist; a note when the message is
    compared with embeddings the output head does not read."""
    if lm.tokenizer is None:
        raise InputError(f"model '{cfg.model}' has no tokenizer files; patterns look words up in the vocabulary - "
                         "save the tokenizer beside the model (save_pretrained)")
    parse_range(cfg.layers, lm.n_layers, "layers")
    parse_range(cfg.heads, lm.n_heads, "heads")
    if "message" in cfg.kinds and not getattr(lm.config, "tie_word_embeddings", True):
        ctx.warn("note: input and output embeddings are not tied in this model; messages are compared with the "
                 "INPUT embeddings, which is not what the model's output head reads")


def compute_patterns(cfg: PatternsConfig, lm, ctx=None) -> PatternsResult:
    """Pattern/message projections of ``cfg.words`` and every chosen head's W^P / W^M spectrum (nothing written)."""
    layers = parse_range(cfg.layers, lm.n_layers, "layers")
    heads = set(parse_range(cfg.heads, lm.n_heads, "heads"))
    flt = VocabFilter(special=not cfg.keep_special, subwords=cfg.no_subwords,
                      bpe_fragments=cfg.no_bpe_fragments, high_bias=cfg.no_high_bias)
    w = head_weights(lm, device="cpu")  # shared by the projections and the spectra
    rows, used = compute(lm, list(cfg.words), layers, cfg.kinds, cfg.top_k, cfg.sentence, cfg.layernorm, flt,
                         cfg.strict, w)
    spectra = []
    for kind in KINDS:
        s, eff = spectrum(w, kind)
        for layer in layers:
            for h in sorted(heads):
                spectra.append((layer, h, kind, eff[layer, h].item(), s[layer, h].tolist()))
    return PatternsResult(cfg, [r for r in rows if r[2] in heads], used, spectra)


def save(folder, result: PatternsResult, ctx=None) -> list[str]:
    """patterns.csv, patterns.md and spectrum.csv of ``result`` into ``folder``."""
    write_csv(folder / "patterns.csv", PATTERNS_HEADER, ([*r[:6], f"{r[6]:.6f}"] for r in result.rows))
    write_text(folder / "patterns.md", patterns_markdown(result.config, result.rows, result.used))
    write_csv(folder / "spectrum.csv", ["layer", "head", "kind", "effective_rank", "singular_values"],
              ([layer, h, kind, f"{eff:.4f}", " ".join(f"{v:.5g}" for v in sv)]
               for layer, h, kind, eff, sv in result.spectra))
    return ["patterns.csv", "patterns.md", "spectrum.csv"]


def summary(result: PatternsResult, ctx=None) -> dict:
    return {"tokens_used": {w: p for w, (_, p) in zip(result.config.words, result.used)},
            "top_tokens": top_tokens(result.rows)}


def top_tokens(rows) -> dict:
    """{word: {kind: {"L<l>H<h>": [tokens, best first]}}} - the result in a form reports read directly."""
    out: dict = {}
    for word, layer, head, kind, _, token, _ in rows:
        out.setdefault(word, {}).setdefault(kind, {}).setdefault(f"L{layer}H{head}", []).append(token)
    return out


def patterns_markdown(cfg: PatternsConfig, rows, used) -> str:
    """patterns.md: what pattern and message mean, which inputs and filters were used, then the tables."""
    if cfg.sentence:
        inputs = f"each word's hidden state at the layer's attention input in the sentence {cfg.sentence!r}"
    else:
        inputs = "vocabulary embeddings" + (", passed through each layer's input LayerNorm" if cfg.layernorm else "")
    filters = ["special and [unused] tokens dropped" if not cfg.keep_special else "special tokens kept"]
    filters += [text for flag, text in ((cfg.no_subwords, "'##' pieces dropped"),
                                        (cfg.no_bpe_fragments, "BPE fragments dropped"),
                                        (cfg.no_high_bias, "tokens in the top-k of over half the rows dropped")) if flag]
    md = [f"# Pattern/message projections: {model_label(cfg.model)}", "",
          "For each word, layer and head, the vocabulary tokens most similar (cosine) to",
          "- the **pattern** p = x W_Q W_K^T: what the head *looks for* in keys when the word is the query;",
          "- the **message** m = x W_V W_O: what the head *writes* into the residual stream when it attends to the word.",
          "", f"Inputs x: {inputs}. Vocabulary: the input embeddings"
          + (" after each layer's input LayerNorm" if cfg.layernorm else " (raw)") + f". Filters: {'; '.join(filters)}. "
          f"k = {cfg.top_k} tokens per row.",
          "Tokens used (a word that splits uses its first piece): "
          + ", ".join(f"{w} -> {p}" for w, (_, p) in zip(cfg.words, used)) + "."]
    for kind in cfg.kinds:
        for word in cfg.words:
            md.append(f"\n## {kind}s of '{word}'\n\n| layer | head | top {cfg.top_k} (cosine) |\n|---|---|---|")
            group = {}
            for r in rows:
                if r[3] == kind and r[0] == word:
                    group.setdefault((r[1], r[2]), []).append(f"{r[5]} ({r[6]:.2f})".replace("|", "\\|"))
            md += [f"| {layer} | {h} | {', '.join(v)} |" for (layer, h), v in sorted(group.items())]
    return "\n".join(md) + "\n"
