"""In-context learning score for masked LMs (the paper's Figure 5): the science; ``attnlab icl`` is the glue.

score = loss with 50 tokens of context - loss with 500 tokens of context (positive: more context helps).

Protocols:
  paper         replicates the paper's notebook: draw random articles until one has >= 500 tokens (with
                [CLS]/[SEP]); keep its first 500 tokens, mask one position uniform in [0, 499] and take the
                model's loss with labels = the *unmasked* ids, i.e. the mean cross-entropy over ALL 500
                positions (499 of which the model can see: mostly a copy task); then keep the first 50 tokens,
                mask an independently drawn position in [0, 49], same loss. Reported mean 0.23 (notebook 0.256).
  masked-token  (default) the cross-entropy of the masked token only, at one target position inside the first
                50 tokens, seen with 50 and with 500 tokens of context: what the extra 450 tokens buy. Paired
                bootstrap 95% CI and the share of trials that improve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.errors import CorpusError, InputError, MissingHeadError
from attnlab.core.outputs import write_csv, write_json
from attnlab.core.stats import bootstrap_ci
from attnlab.icl.experiment import ICL_PROTOCOLS, LONG, SHORT  # noqa: F401  (the config's constants)



@dataclass
class Trial:
    doc_index: int
    pos_long: int
    pos_short: int


def tokenize_lengths(tokenizer, docs):
    """Token ids of every document (with the model's special tokens, e.g. [CLS]/[SEP]), untruncated."""
    return [tokenizer(d.text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"] for d in docs]


def draw_trials(encodings, protocol: str, n_trials: int, seed: int) -> list[Trial]:
    """The random draws, made once so that both losses of a trial use the same article and positions."""
    qualified = [i for i, e in enumerate(encodings) if len(e) >= LONG]
    if not qualified:
        raise CorpusError(
            f"no article of the corpus has >= {LONG} tokens (0 of {len(encodings)} qualified); the ICL score "
            f"needs {LONG}-token contexts"
        )
    if protocol == "masked-token" and len(qualified) < min(n_trials, 10):
        raise CorpusError(
            f"only {len(qualified)} of {len(encodings)} articles have >= {LONG} tokens; need at least "
            f"{min(n_trials, 10)} for {n_trials} trials - use a larger corpus"
        )
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n_trials):
        if protocol == "paper":
            # the notebook's loop: draw articles uniformly (with replacement) until one is long enough
            while True:
                doc = int(rng.integers(len(encodings)))
                if len(encodings[doc]) >= LONG:
                    break
            trials.append(Trial(doc, int(rng.integers(LONG)), int(rng.integers(SHORT))))
        else:
            doc = int(qualified[rng.integers(len(qualified))])
            pos = int(rng.integers(1, SHORT))  # a real token inside the first 50: never [CLS]
            trials.append(Trial(doc, pos, pos))
    return trials


def _masked_inputs(encodings, trials, length, pos_attr, mask_id):
    ids = torch.tensor([encodings[t.doc_index][:length] for t in trials], dtype=torch.long)
    labels = ids.clone()
    pos = torch.tensor([getattr(t, pos_attr) for t in trials], dtype=torch.long)
    ids[torch.arange(len(trials)), pos] = mask_id
    return ids, labels, pos


def batched_losses(lm, ids, labels, pos, *, all_positions: bool, batch_size: int, desc: str | None = None) -> torch.Tensor:
    """Per-sequence loss: mean CE over all positions (paper) or CE at ``pos`` only. [B] float64."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a whole number of at least 1, got {batch_size}")
    out = []
    device = lm.device
    head = lm.lm_head()
    starts = range(0, len(ids), batch_size)
    if desc:
        from attnlab.core.progress import bar

        starts = bar(starts, desc=desc, unit="batch")
    with torch.inference_mode():
        for s in starts:
            x, y, p = ids[s:s + batch_size].to(device), labels[s:s + batch_size].to(device), pos[s:s + batch_size]
            hidden = lm.base(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            if all_positions:
                logits = head(hidden).float()  # [b, S, V]
                ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
            else:  # the head only where it is needed: [b, V] instead of [b, S, V]
                rows = torch.arange(len(x), device=device)
                logits = head(hidden[rows, p.to(device)]).float()
                ce = torch.nn.functional.cross_entropy(logits, y[rows, p.to(device)], reduction="none")
            out.append(ce.double().cpu())
    return torch.cat(out)


def icl_trials(lm, docs, protocol: str, n_trials: int, seed: int, batch_size: int | None = None,
               progress: bool = False):
    """Run the trials; return (trials, loss_short, loss_long) with losses as float64 arrays."""
    if protocol not in ICL_PROTOCOLS:
        raise InputError(f"unknown ICL protocol {protocol!r}; use one of {', '.join(ICL_PROTOCOLS)}")
    if n_trials < 1:
        raise InputError(f"--trials must be at least 1, got {n_trials}")
    if lm.is_causal:
        raise InputError(f"model '{lm.name}' is a causal LM; the ICL score here masks a token and reads it with "
                         "context on both sides, which needs a masked LM (BERT, RoBERTa, ModernBERT, ...)")
    if not lm.has_lm_head or lm.lm_head() is None:
        raise MissingHeadError(f"model '{lm.name}' has no masked-LM head; the ICL score needs a masked LM")
    if lm.max_positions < LONG:
        raise InputError(f"model '{lm.name}' has {lm.max_positions} positions; the ICL score needs {LONG}")
    if lm.tokenizer is None or lm.tokenizer.mask_token_id is None:
        raise InputError(f"model '{lm.name}' has no tokenizer with a [MASK] token (no tokenizer files in its folder?); "
                         "the ICL score tokenizes text - save the tokenizer beside the model (save_pretrained)")
    encodings = tokenize_lengths(lm.tokenizer, docs)
    trials = draw_trials(encodings, protocol, n_trials, seed)
    mask_id = lm.tokenizer.mask_token_id
    all_positions = protocol == "paper"
    bs = batch_size or (4 if all_positions else 16)
    long_in = _masked_inputs(encodings, trials, LONG, "pos_long", mask_id)
    short_in = _masked_inputs(encodings, trials, SHORT, "pos_short", mask_id)
    loss_long = batched_losses(lm, *long_in, all_positions=all_positions, batch_size=bs,
                               desc="icl: 500-token contexts" if progress else None).numpy()
    loss_short = batched_losses(lm, *short_in, all_positions=all_positions, batch_size=bs * 4,
                                desc="icl: 50-token contexts" if progress else None).numpy()
    return trials, loss_short, loss_long




@dataclass
class ICLResult:
    """Per-trial losses (float64 ``[T]``) and the summary of their paired difference (short - long)."""

    trials: list[Trial]
    loss_short: np.ndarray
    loss_long: np.ndarray
    protocol: str
    seed: int
    docs: list | None = None  # the documents the trials index (for the article ids and titles saved)
    labels: dict | None = None  # what summary() names the run by: {"model": ..., "corpus": ...}

    @property
    def difference(self) -> np.ndarray:
        return self.loss_short - self.loss_long

    @property
    def ci95(self) -> tuple[float, float]:
        return bootstrap_ci(self.difference, self.seed)

    def summary(self) -> dict:
        diff = self.difference
        lo, hi = self.ci95
        out = {"mean": float(diff.mean()), "ci95": [lo, hi] if np.isfinite([lo, hi]).all() else [None, None],
               "n": len(diff), "share_improved": float((diff > 0).mean()),
               "std": float(diff.std(ddof=1)) if len(diff) > 1 else None, "protocol": self.protocol,
               "seed": self.seed}
        if len(diff) < 2:
            out["note"] = "ci95 and std are null: a confidence interval needs at least 2 trials"
        return {**out, **(self.labels or {})}


def compute_icl(lm, docs, protocol: str = "masked-token", n_trials: int = 50, seed: int = 0,
                batch_size: int | None = None, progress: bool = False) -> ICLResult:
    """The ICL score of a loaded masked LM on ``docs`` (see module doc), as a typed result."""
    trials, loss_short, loss_long = icl_trials(lm, docs, protocol, n_trials, seed, batch_size, progress)
    bad = ~(np.isfinite(loss_short) & np.isfinite(loss_long))
    if bad.any():
        raise InputError(f"model '{lm.name}' produced non-finite losses (NaN or inf) in {int(bad.sum())} of "
                         f"{len(bad)} ICL trials; its weights may hold NaN or inf - check the checkpoint")
    return ICLResult(trials, loss_short, loss_long, protocol, seed, docs)


# ---------------------------------------------------------------- the record's steps (attnlab.icl.experiment.ICL)

ICL_HEADER = ["trial", "article_id", "title", "pos_long", "pos_short", "loss_50", "loss_500", "difference"]


def compute(cfg, lm, ctx) -> ICLResult:
    result = compute_icl(lm, ctx.docs, cfg.protocol, cfg.trials, cfg.seed, ctx.batch_size, ctx.progress)
    result.labels = {"model": cfg.model, "corpus": cfg.corpus}
    return result


def summary_of(result: ICLResult, ctx=None) -> dict:
    return {"summary": result.summary()}


def save(folder, result: ICLResult, ctx=None) -> list[str]:
    """icl.csv (one row a trial) and summary.json of ``result`` into ``folder``."""
    docs = result.docs
    write_csv(folder / "icl.csv", ICL_HEADER, (
        [i, docs[t.doc_index].id, docs[t.doc_index].title, t.pos_long, t.pos_short, f"{ls:.8g}", f"{ll:.8g}",
         f"{d:.8g}"]
        for i, (t, ls, ll, d) in enumerate(zip(result.trials, result.loss_short, result.loss_long,
                                               result.difference))))
    write_json(folder / "summary.json", result.summary())
    return ["icl.csv", "summary.json"]
