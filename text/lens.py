"""The logit lens and a tuned lens (the science of ``attnlab lens``).

Logit lens: layer l's residual stream ``h_l`` (``l = 0``: the embeddings) through the model's own final norm and
LM head - ``head(final_norm(h_l))``; at the last layer that is the model's own output (the stream there is normed
already). Post-LN families (BERT) have no final norm: every layer's output is normed, and the lens applies the
LM head (its transform and decoder) to it. Tuned lens (Belrose et al. 2023): one affine translator per layer,
``h -> h A_l + b_l``, identity at the start (so it starts as the logit lens), trained to minimise the KL from the
model's final distribution on corpus text.

Targets: causal models, the actual next token; masked LMs, the token at a position masked in turn (one masked copy
of the text per position).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attnlab.core.errors import InputError, MissingHeadError
from attnlab.core.outputs import atomic_path, write_csv
from attnlab.text.experiment import LensConfig

LENS_HEADER = ["lens", "layer", "position", "token", "target", "p_target", "rank_target", "kl", "top_tokens",
               "top_probs"]


def read_out(lm, h: torch.Tensor, last: bool) -> torch.Tensor:
    """Logits ``[..., V]`` of a residual stream ``h [..., D]``: the final norm (unless it is the last layer's stream,
    normed already), then the LM head."""
    norm = lm.arch.final_norm(lm.base)
    if norm is not None and not last:
        h = norm(h)
    return lm.lm_head()(h).float()


@dataclass
class Translators:
    """A tuned lens: ``A [L, D, D]``, ``b [L, D]`` for layers 0..L-1 (the last layer reads out as it is)."""

    A: torch.Tensor
    b: torch.Tensor

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> "Translators":
        return cls(torch.eye(d_model).repeat(n_layers, 1, 1), torch.zeros(n_layers, d_model))

    def apply(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        if layer >= len(self.A):
            return h
        return h @ self.A[layer].to(h) + self.b[layer].to(h)

    def save(self, path) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({"A": self.A.contiguous(), "b": self.b.contiguous()}, str(tmp))

    @classmethod
    def load(cls, path) -> "Translators":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["A"], t["b"])


def _check(lm) -> None:
    if not lm.has_lm_head or lm.lm_head() is None:
        raise MissingHeadError(f"model '{lm.name}' has no LM head, and the lens reads each layer through it; use a "
                               "checkpoint with its head (e.g. bert-base-uncased, gpt2) - a sentence encoder such as "
                               "all-MiniLM-L6-v2 has none")
    if lm.tokenizer is None:
        raise InputError(f"model '{lm.name}' has no tokenizer files; save the tokenizer beside the model")


def _streams(lm, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's residual stream ``(L + 1) x [B, S, D]`` (0: the embeddings)."""
    with torch.inference_mode():
        return lm.base(input_ids=ids.to(lm.device), output_hidden_states=True).hidden_states


@dataclass
class LensReading:
    """Per lens, layer and query: the top tokens and probabilities, the target's probability and rank, the KL."""

    rows: list = field(default_factory=list)  # LENS_HEADER rows
    kl: dict = field(default_factory=dict)  # lens -> [L + 1] mean KL
    ranks: dict = field(default_factory=dict)  # lens -> [L + 1, Q] rank of the target


def read(lm, ids, positions, targets, translators: Translators | None, top_k: int, labels=None) -> LensReading:
    """Read the queries at ``positions [B]`` of sequences ``ids [B, S]`` (one query a sequence) with the logit lens
    and, when given, the tuned lens; ``targets [B]`` the token each should predict; ``labels`` names the queries."""
    streams = _streams(lm, ids)
    n_layers = len(streams) - 1
    rows_idx = torch.arange(ids.shape[0])
    out = LensReading()
    lenses = {"logit": None, **({"tuned": translators} if translators is not None else {})}
    with torch.inference_mode():
        final = torch.log_softmax(read_out(lm, streams[-1][rows_idx, positions.to(streams[-1].device)], True), -1)
        for name, tr in lenses.items():
            kls, ranks = [], []
            for layer in range(n_layers + 1):
                h = streams[layer][rows_idx, positions.to(streams[layer].device)]
                if tr is not None:
                    h = tr.apply(layer, h)
                logp = torch.log_softmax(read_out(lm, h, layer == n_layers), -1)
                kl = (final.exp() * (final - logp)).sum(-1).clamp_min(0)
                p_t = logp[rows_idx, targets].exp()
                rank = (logp > logp[rows_idx, targets][:, None]).sum(-1) + 1
                top_p, top_i = logp.exp().topk(top_k, dim=-1)
                kls.append(kl.cpu())
                ranks.append(rank.cpu())
                for q in range(len(positions)):
                    out.rows.append([name, layer, int(positions[q]), labels[q] if labels else "",
                                     lm.tokenizer.convert_ids_to_tokens([int(targets[q])])[0], float(p_t[q]),
                                     int(rank[q]), float(kl[q]),
                                     " ".join(lm.tokenizer.convert_ids_to_tokens(top_i[q].tolist())),
                                     " ".join(f"{v:.4g}" for v in top_p[q].tolist())])
            out.kl[name] = torch.stack(kls).mean(1).tolist()
            out.ranks[name] = torch.stack(ranks).numpy()
    return out


def text_queries(lm, text: str):
    """The queries of a text: ``(ids [B, S], positions [B], targets [B], labels)``. Causal: one sequence, every
    position but the last, target the next token. Masked: one copy per ordinary position, that position masked,
    target the token it hid."""
    from attnlab.text.attention import tokenize

    ids, tokens = tokenize(lm, text)
    seq = torch.tensor(ids)
    if lm.is_causal:
        if len(ids) < 2:
            raise InputError("the text needs at least two tokens (the lens reads what the next one is)")
        positions = torch.arange(len(ids) - 1)
        return seq[None].expand(len(positions), -1), positions, seq[1:], tokens[:-1]
    special = set(lm.tokenizer.all_special_ids)
    positions = torch.tensor([i for i, t in enumerate(ids) if t not in special])
    if not len(positions):
        raise InputError("the text has no ordinary token to mask")
    batch = seq[None].repeat(len(positions), 1)
    batch[torch.arange(len(positions)), positions] = lm.tokenizer.mask_token_id
    return batch, positions, seq[positions], [tokens[i] for i in positions.tolist()]


def rrt_queries(lm, cfg: LensConfig):
    """Repeated random tokens (standard RRT, clean protocol): the masked token of the second copy (masked LMs) or
    the token that follows a repeated one (causal: what prefix matching predicts)."""
    from attnlab.induction.protocols import make_protocol, token_spec_for
    from attnlab.induction.variants import build_batch, get_variant

    batch = build_batch(get_variant("standard"), make_protocol("clean", token_spec_for(lm)), cfg.trials, cfg.seq_len,
                        cfg.seed, max_positions=lm.max_positions)
    q = batch.mask_index
    rows = torch.arange(len(q))
    targets = batch.input_ids[rows, q + 1] if lm.is_causal else batch.masked_token
    return batch.input_ids, q, targets, [f"trial {t}" for t in range(len(q))]


def train_tuned_lens(lm, docs, cfg: LensConfig, progress: bool = False) -> tuple[Translators, dict]:
    """Train one affine translator per layer on corpus text (KL to the final distribution; identity start);
    returns the translators and the held-out KL before and after."""
    t0 = time.perf_counter()
    seqs, total, limit = [], 0, int(cfg.train_tokens * 1.1)
    for doc in docs:
        ids = lm.tokenizer(doc.text, add_special_tokens=True, truncation=True, max_length=min(128, lm.max_positions),
                           verbose=False)["input_ids"]
        if len(ids) >= 16:
            seqs.append(ids)
            total += len(ids)
        if total >= limit:
            break
    if total < 256:
        raise InputError(f"the corpus gives only {total} tokens; the tuned lens needs at least 256 - use a larger corpus")
    streams = None
    for ids in seqs:
        hs = _streams(lm, torch.tensor([ids]))
        layer_states = [h[0].float().cpu() for h in hs]
        streams = layer_states if streams is None else [torch.cat([a, b]) for a, b in zip(streams, layer_states)]
    n_layers = len(streams) - 1
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(streams[0].shape[0], generator=g)
    held = order[: max(32, len(order) // 11)]
    train = order[len(held):]
    tr = Translators.identity(n_layers, lm.d_model)
    params = [tr.A.requires_grad_(True), tr.b.requires_grad_(True)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    head_dtype = lm.dtype

    def loss_of(index) -> torch.Tensor:
        with torch.no_grad():
            final = torch.log_softmax(read_out(lm, streams[-1][index].to(lm.device, head_dtype), True), -1)
        loss = 0.0
        for layer in range(n_layers):
            h = tr.apply(layer, streams[layer][index].to(lm.device))
            logp = torch.log_softmax(read_out(lm, h.to(head_dtype), False), -1)
            loss = loss + (final.exp() * (final - logp)).sum(-1).mean()
        return loss / n_layers

    for p in lm.model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        before = float(loss_of(held))
    steps = range(cfg.steps)
    if progress:
        from attnlab.core.progress import bar

        steps = bar(steps, desc="tuned lens", unit="step")
    for _ in steps:
        index = train[torch.randint(len(train), (min(256, len(train)),), generator=g)]
        opt.zero_grad()
        loss = loss_of(index)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_of(held))
    tr = Translators(tr.A.detach(), tr.b.detach())
    return tr, {"train_tokens": int(len(train)), "heldout_tokens": int(len(held)), "steps": cfg.steps,
                "heldout_kl_before": before, "heldout_kl_after": after, "seconds": round(time.perf_counter() - t0, 2)}


@dataclass
class LensResult:
    config: LensConfig
    reading: LensReading
    translators: Translators | None
    tuned_stats: dict | None
    rrt: dict | None
    unembedding: str
    causal: bool


def compute(cfg: LensConfig, lm, ctx) -> LensResult:
    from attnlab.core.weights import unembedding

    _check(lm)
    translators = stats = None
    if cfg.tuned:
        translators, stats = train_tuned_lens(lm, ctx.docs, cfg, getattr(ctx, "progress", False))
    ids, positions, targets, labels = rrt_queries(lm, cfg) if cfg.rrt else text_queries(lm, cfg.text)
    reading = read(lm, ids, positions, targets, translators, cfg.top_k, labels)
    rrt = None
    if cfg.rrt:
        rrt = {}
        for name, ranks in reading.ranks.items():
            top1 = ranks == 1  # [L + 1, T]
            first = np.where(top1.any(0), top1.argmax(0), -1)
            rrt[name] = first.tolist()
    _, source = unembedding(lm)
    return LensResult(cfg, reading, translators, stats, rrt, source, lm.is_causal)


def save(folder, result: LensResult, ctx=None) -> list[str]:
    write_csv(folder / "lens.csv", LENS_HEADER,
              ([*r[:5], f"{r[5]:.6g}", r[6], f"{r[7]:.6g}", r[8], r[9]] for r in result.reading.rows))
    out = ["lens.csv"]
    if result.rrt:
        names = list(result.rrt)
        write_csv(folder / "rrt.csv", ["trial", *[f"first_top1_layer_{n}" for n in names]],
                  ([t, *(result.rrt[n][t] for n in names)] for t in range(len(result.rrt[names[0]]))))
        out.append("rrt.csv")
    if result.translators is not None:
        result.translators.save(folder / "tuned_lens.safetensors")
        out.append("tuned_lens.safetensors")
    return out


def summary(result: LensResult, ctx=None) -> dict:
    out = {"kl_by_layer": result.reading.kl, "unembedding": result.unembedding, "causal": result.causal,
           "target": "the next token" if result.causal else "the token at a masked position (each masked in turn)"}
    if result.tuned_stats:
        out["tuned_lens"] = result.tuned_stats
    if result.rrt:
        first = np.array(result.rrt["logit"])
        reached = first[first >= 0]
        out["rrt"] = {"trials": len(first), "never": int((first < 0).sum()),
                      "mean_first_layer": float(reached.mean()) if len(reached) else math.nan,
                      "first_layer_by_lens": {n: v for n, v in result.rrt.items()}}
    return out
