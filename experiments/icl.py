"""In-context learning score for masked LMs (the paper's Figure 5): ``attnlab icl``.

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

Outputs: icl.csv (one row a trial), summary.json, icl_histogram.png, meta.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.core.corpus import DEFAULT_CORPUS, load_corpus
from attnlab.core.errors import CorpusError, InputError, MissingHeadError
from attnlab.core.models import model_label, resolve_model
from attnlab.core.outputs import begin_run, write_csv, write_json
from attnlab.core.provenance import corpus_fingerprint
from attnlab.core.resources import check_fits
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int, print_wrote

LONG, SHORT = 500, 50
ICL_PROTOCOLS = ("masked-token", "paper")


@dataclass
class ICLConfig:
    model: str = "bert-base-uncased"
    corpus: str = DEFAULT_CORPUS
    protocol: str = "masked-token"
    trials: int = 50
    seed: int = 0
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.protocol not in ICL_PROTOCOLS:
            raise InputError(f"unknown ICL protocol {self.protocol!r}; use one of {', '.join(ICL_PROTOCOLS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"trials must be a whole number of at least 1, got {self.trials}")
        # both inputs of every trial ([T, 500] and [T, 50] ids, a few copies) must fit before any is drawn
        per_trial = (LONG + SHORT) * 8 * 4
        check_fits(self.trials * per_trial, f"{self.trials} ICL trials", per_trial, "trials")


@dataclass
class Trial:
    doc_index: int
    pos_long: int
    pos_short: int


def tokenize_lengths(tokenizer, docs):
    """Token ids of every document (with [CLS]/[SEP]), untruncated."""
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
    head = lm.model.cls
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


def bootstrap_ci(diffs: np.ndarray, seed: int, n_boot: int = 10000, level: float = 0.95):
    """Percentile bootstrap CI of the mean of paired differences."""
    if len(diffs) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed + 1)
    means = diffs[rng.integers(len(diffs), size=(n_boot, len(diffs)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def icl_trials(lm, docs, protocol: str, n_trials: int, seed: int, batch_size: int | None = None,
               progress: bool = False):
    """Run the trials; return (trials, loss_short, loss_long) with losses as float64 arrays."""
    if protocol not in ICL_PROTOCOLS:
        raise InputError(f"unknown ICL protocol {protocol!r}; use one of {', '.join(ICL_PROTOCOLS)}")
    if n_trials < 1:
        raise InputError(f"--trials must be at least 1, got {n_trials}")
    if lm.model_type != "bert" or not lm.has_lm_head:
        raise MissingHeadError(f"model '{lm.name}' has no masked-LM head; the ICL score needs a BERT masked LM")
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


ICL_HEADER = ["trial", "article_id", "title", "pos_long", "pos_short", "loss_50", "loss_500", "difference"]


def run_icl(cfg: ICLConfig, out_dir, *, lm=None, docs=None, device="auto", batch_size=None, reuse=True,
            progress=False) -> dict:
    """The ICL score into ``out_dir``; reused when finished with the same config, model and corpus content.
    ``lm``: a loaded masked LM, a loader callable, or None (load ``cfg.model``)."""
    run, config, key, identity, meta = begin_run(out_dir, "icl", cfg, lm, reuse,
                                                 corpus=corpus_fingerprint(cfg.corpus, docs))
    if meta:
        return meta
    t0 = time.perf_counter()
    if docs is None:
        docs = load_corpus(cfg.corpus)
    lm = resolve_model(lm, cfg, device, masked_lm=True)
    identity["model"] = lm.fingerprint
    trials, loss_short, loss_long = icl_trials(lm, docs, cfg.protocol, cfg.trials, cfg.seed, batch_size, progress)
    diff = loss_short - loss_long
    lo, hi = bootstrap_ci(diff, cfg.seed)

    stage = run.stage()
    write_csv(stage / "icl.csv", ICL_HEADER, (
        [i, docs[t.doc_index].id, docs[t.doc_index].title, t.pos_long, t.pos_short, f"{ls:.8g}", f"{ll:.8g}", f"{d:.8g}"]
        for i, (t, ls, ll, d) in enumerate(zip(trials, loss_short, loss_long, diff))))
    ci95 = [lo, hi] if np.isfinite([lo, hi]).all() else [None, None]
    summary = {"mean": float(diff.mean()), "ci95": ci95, "n": len(diff),
               "share_improved": float((diff > 0).mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else None,
               "protocol": cfg.protocol, "model": cfg.model, "corpus": cfg.corpus, "seed": cfg.seed,
               "paper_reported_mean": 0.23 if cfg.protocol == "paper" else None}
    if len(diff) < 2:
        summary["note"] = "ci95 and std are null: a confidence interval needs at least 2 trials"
    write_json(stage / "summary.json", summary)
    from attnlab.figures.histogram import icl_histogram

    icl_histogram(diff, summary["mean"], (lo, hi), f"Loss({SHORT} tokens) - Loss({LONG} tokens), {len(diff)} trials"
                  f"\n{model_label(cfg.model)}, protocol {cfg.protocol}", stage / "icl_histogram.png",
                  paper_mean=0.23 if cfg.protocol == "paper" else None)
    return run.commit(key, config, ["icl.csv", "summary.json", "icl_histogram.png"], identity, model=lm.meta,
                      summary=summary, timings={"total_s": round(time.perf_counter() - t0, 3)})


def add_parser(sub) -> None:
    p = sub.add_parser("icl", help="in-context learning score of a masked LM (Figure 5)",
                       description=__doc__.split("Outputs:")[0], formatter_class=_raw())
    p.add_argument("--model", default="bert-base-uncased", help="masked LM: Hub id or folder (default: bert-base-uncased)")
    p.add_argument("--revision", default=None)
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="a .jsonl/.jsonl.gz with a 'text' field, a folder of .txt files, or "
                        f"hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (default: {DEFAULT_CORPUS})")
    p.add_argument("--protocol", default="masked-token", choices=ICL_PROTOCOLS)
    p.add_argument("--trials", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _run(args) -> int:
    cfg = ICLConfig(model=args.model, corpus=args.corpus, protocol=args.protocol, trials=args.trials, seed=args.seed,
                    revision=args.revision, dtype=args.dtype)
    meta = run_icl(cfg, args.out, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                   progress=not args.no_progress)
    s = meta["summary"]
    ci = ("95% CI " + " .. ".join(f"{v:.4f}" for v in s["ci95"])) if None not in s["ci95"] else "no CI: 1 trial"
    print_wrote(meta, args.out, f" - mean {s['mean']:.4f} ({ci}), n={s['n']}, improved in "
                f"{100 * s['share_improved']:.0f}%")
    return 0
