"""Pattern and message projections vs the vocabulary: ``attnlab patterns``.

For each word (or each word's position in --sentence), layer and head: the top-k vocabulary tokens by cosine
similarity with the pattern p = x W_Q W_K^T (what the head looks for) and the message m = x W_V W_O (what it
writes). Outputs: patterns.csv (input, layer, head, kind, rank, token, similarity), patterns.md, spectrum.csv
(singular values and effective rank of every head's W^P and W^M), meta.json.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from attnlab.core.activations import attention_inputs
from attnlab.core.errors import InputError
from attnlab.core.models import load_model
from attnlab.core.outputs import write_meta, write_text
from attnlab.core.weights import head_weights
from attnlab.experiments.common_args import add_model_args
from attnlab.geometry.projections import (
    VocabFilter, high_bias_mask, layer_input_norm, parse_range, project, spectrum, top_k_vocab, word_token,
)

KINDS = ("pattern", "message")


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
                    x[:, j] = layer_input_norm(lm, layer)(x[:, j].to(lm.device)).float().cpu()
        return x, used
    ids = tok(sentence, add_special_tokens=lm.model_type == "bert")["input_ids"]
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
    with torch.inference_mode():
        return layer_input_norm(lm, layer)(emb).float().cpu()


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


def add_parser(sub) -> None:
    p = sub.add_parser("patterns", help="pattern/message projections compared with the vocabulary",
                       description=__doc__.split("Outputs:")[0])
    add_model_args(p, default_model="bert-base-uncased")
    p.add_argument("--words", required=True, help="comma-separated words, e.g. couch,dog,run,happy")
    p.add_argument("--layers", default="all", help="e.g. 0-3 or 0,5,11 (default: all)")
    p.add_argument("--heads", default="all", help="heads to report (default: all)")
    p.add_argument("--top-k", type=int, default=15)
    p.add_argument("--kinds", default="pattern,message", help="pattern, message or both")
    p.add_argument("--sentence", default=None,
                   help="use each word's hidden state in this sentence at each layer's input instead of its embedding")
    p.add_argument("--layernorm", action="store_true",
                   help="apply each layer's input LayerNorm to the vocabulary (and to embedding inputs)")
    p.add_argument("--keep-special", action="store_true", help="keep special and [unused] tokens")
    p.add_argument("--no-subwords", action="store_true", help="drop BERT '##' pieces")
    p.add_argument("--no-bpe-fragments", action="store_true", help="drop GPT-2 tokens without a leading space")
    p.add_argument("--no-high-bias", action="store_true", help="drop tokens in the top-k of over half the rows")
    p.add_argument("--strict", action="store_true", help="refuse words that split into several pieces")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run)


def _run(args) -> int:
    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    layers = parse_range(args.layers, lm.n_layers, "layers")
    heads = set(parse_range(args.heads, lm.n_heads, "heads"))
    kinds = [k.strip() for k in args.kinds.split(",")]
    if any(k not in KINDS for k in kinds):
        raise InputError(f"--kinds takes {', '.join(KINDS)}, got {args.kinds!r}")
    if args.top_k < 1:
        raise InputError("--top-k must be at least 1")
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if "message" in kinds and not getattr(lm.config, "tie_word_embeddings", True):
        print("note: input and output embeddings are not tied in this model; messages are compared with the "
              "INPUT embeddings, which is not what the model's output head reads")
    flt = VocabFilter(special=not args.keep_special, subwords=args.no_subwords,
                      bpe_fragments=args.no_bpe_fragments, high_bias=args.no_high_bias)
    w = head_weights(lm, device="cpu")  # shared by the projections and the spectra
    rows, used = compute(lm, words, layers, kinds, args.top_k, args.sentence, args.layernorm, flt, args.strict, w)
    rows = [r for r in rows if r[2] in heads]
    out = Path(args.out)
    csv = io.StringIO()
    csv.write("input,layer,head,kind,rank,token,similarity\n")
    for r in rows:
        token = r[5].replace('"', '""')
        csv.write(f'{r[0]},{r[1]},{r[2]},{r[3]},{r[4]},"{token}",{r[6]:.6f}\n')
    write_text(out / "patterns.csv", csv.getvalue())
    md = [f"# Pattern/message projections: {args.model}\n"]
    for kind in kinds:
        for word in words:
            md.append(f"\n## {kind}s of '{word}'\n\n| layer | head | top {args.top_k} (cosine) |\n|---|---|---|")
            group = {}
            for r in rows:
                if r[3] == kind and r[0] == word:
                    group.setdefault((r[1], r[2]), []).append(f"{r[5]} ({r[6]:.2f})")
            md += [f"| {layer} | {h} | {', '.join(v)} |" for (layer, h), v in sorted(group.items())]
    write_text(out / "patterns.md", "\n".join(md) + "\n")
    spec = io.StringIO()
    spec.write("layer,head,kind,effective_rank,singular_values\n")
    for kind in KINDS:
        s, eff = spectrum(w, kind)
        for layer in range(lm.n_layers):
            for h in range(lm.n_heads):
                sv = " ".join(f"{v:.5g}" for v in s[layer, h].tolist())
                spec.write(f"{layer},{h},{kind},{eff[layer, h].item():.4f},{sv}\n")
    write_text(out / "spectrum.csv", spec.getvalue())
    write_meta(out, vars(args) | {"func": None}, ["patterns.csv", "patterns.md", "spectrum.csv"], model=lm.meta,
               tokens_used={w_: p for w_, (_, p) in zip(words, used)},
               timings={"total_s": round(time.perf_counter() - t0, 3)})
    print(f"wrote {out}: patterns.csv, patterns.md, spectrum.csv")
    return 0
