"""Induction maps (the paper's Figures 7-9): ``attnlab induction``, ``attnlab induction-sweep``, ``attnlab variants``.

Outputs of one run, in its output directory:
    scores.csv   tidy: model, variant, protocol, target, layer, head, mean, sem, n_trials, share_r0
    trials.npz   input_ids [T,S], mask_index [T], target_index_<t> [T], attention_<t> [T,L,H], quirk [T]
    meta.json    model, resolved source, config, reuse key and what it covers, seed, versions, timings
    induction_<variant>_<target>.png   one heatmap per target
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnlab.core.errors import InputError
from attnlab.core.models import model_label, resolve_model
from attnlab.core.outputs import begin_run, atomic_path, write_csv
from attnlab.core.provenance import source_fingerprint
from attnlab.core.resources import check_fits
from attnlab.experiments.common_args import add_output_args, add_runtime_args, print_wrote
from attnlab.figures.heatmap import induction_map
from attnlab.induction.protocols import PROTOCOLS, make_protocol, token_spec_for
from attnlab.induction.scores import InductionScores, induction_scores
from attnlab.induction.variants import RRTBatch, build_batch, check_length, get_variant, list_variants

FIGURE9_MODELS = ["prajjwal1/bert-tiny", "prajjwal1/bert-small", "prajjwal1/bert-medium", "bert-large-uncased"]
VIEW_TRIALS = 3  # trials whose full [MASK] attention rows are kept for the interactive view
PROTOCOL_NOTES = {
    "clean": "clean protocol: [CLS] X X [SEP], distinct ordinary tokens, mask never at a copy's edge",
    "paper": "paper protocol: the paper's code, quirks included (leading [SEP], ids in [100, 20000) with "
             "replacement, r = 0 masks the last token of the first copy)",
}
CAUSAL_NOTE = ("causal model: BOS X X (X X when the tokenizer has no BOS; no [MASK]); the query is a token of the "
               "second copy, read left to right; 'after' is the prefix-matching target (the token that followed the "
               "previous instance)")
TARGET_WORDS = {
    "prev": "previous instance of the masked token",
    "before": "token before the previous instance",
    "after": "token after the previous instance",
    "next": "next instance of the masked token (third copy)",
    "after_prev_of_left": "token after the first-copy instance of the left neighbour",
    "before_prev_of_right": "token before the first-copy instance of the right neighbour",
}


@dataclass
class InductionConfig:
    model: str
    variant: str = "standard"
    protocol: str = "clean"
    trials: int = 50
    seq_len: int | None = None  # None: the variant's default for the protocol (200; triple 150)
    seed: int = 0
    revision: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise InputError(f"trials must be a whole number of at least 1, got {self.trials}")
        if self.seq_len is not None and self.seq_len < 3:
            raise InputError(f"seq_len must be at least 3 (a masked token needs both neighbours), got {self.seq_len}")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def figure_name(variant: str, target: str) -> str:
    return f"induction_{variant}_{target}.png"


def target_words(target: str, causal: bool = False) -> str:
    if causal and target == "after":
        return "token after the previous instance (prefix matching)"
    if causal and target == "prev":
        return "previous instance of the token"
    return TARGET_WORDS.get(target, f"target '{target}'")


def score_rows(model: str, variant: str, protocol: str, scores, share_r0):
    """Rows of scores.csv (share_r0: share of trials hit by the paper protocol's r = 0 quirk, '' if unknown)."""
    for target, mean in scores.mean.items():
        sem = scores.sem[target]
        for layer in range(mean.shape[0]):
            for head in range(mean.shape[1]):
                yield [model, variant, protocol, target, layer, head, f"{mean[layer, head].item():.8g}",
                       f"{sem[layer, head].item():.8g}", scores.n_trials, share_r0]


SCORES_HEADER = ["model", "variant", "protocol", "target", "layer", "head", "mean", "sem", "n_trials", "share_r0"]


def top_heads(scores, k: int = 10) -> dict:
    """{target: [[layer, head, mean, sem|None], ...]} strongest first (what reports and plots read)."""
    out = {}
    n_heads = next(iter(scores.mean.values())).shape[1]
    for target, mean in scores.mean.items():
        flat = mean.flatten()
        order = flat.argsort(descending=True)[:k].tolist()
        sem = scores.sem[target].flatten()
        out[target] = [[g // n_heads, g % n_heads, float(flat[g]),
                        float(sem[g]) if torch.isfinite(sem[g]) else None] for g in order]
    return out


def _rounded(x) -> list:
    """[L, H] tensor -> nested lists with 6 significant digits (NaN -> None), for meta.json."""
    return [[None if not np.isfinite(v) else float(f"{v:.6g}") for v in row] for row in x.tolist()]


def view_arrays(lm, batch, rows) -> dict:
    """The full attention rows of [MASK] for the first trials (``rows [n, L, H, S]``, kept by
    :func:`induction_scores`; stored as ``view_rows`` float16) and their tokens (``view_tokens [n, S]``,
    ``view_masked [n]``): what the interactive view draws when a head is clicked."""
    n = rows.shape[0]
    ids = batch.input_ids[:n]
    if lm.tokenizer is not None:
        tokens = [lm.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
    else:
        tokens = [[str(i) for i in row.tolist()] for row in ids]
    masked = batch.masked_token[:n].tolist()
    masked = lm.tokenizer.convert_ids_to_tokens(masked) if lm.tokenizer is not None else [str(i) for i in masked]
    return {"view_rows": rows.numpy().astype(np.float16), "view_tokens": np.array(tokens, dtype=np.str_),
            "view_masked": np.array(masked, dtype=np.str_)}


def check_trials_fit(trials: int, seq: int, n_layers: int, n_heads: int, n_targets: int) -> None:
    """Token ids (a few copies while building) and the per-target scores must fit in memory."""
    per_trial = seq * 8 * 4 + n_layers * n_heads * n_targets * 4 * 2
    check_fits(trials * per_trial, f"{trials} trials of {seq} tokens", per_trial, "trials")


@dataclass
class InductionResult:
    """What :func:`compute_induction` found: the trials it built and the scores they gave, plus what a
    writer needs to describe them."""

    config: InductionConfig
    batch: RRTBatch
    scores: InductionScores
    seq_len: int  # n, the random block's length
    sequence_tokens: int  # tokens per sequence, special tokens included
    causal: bool
    timings: dict

    @property
    def share_r0(self) -> float | None:
        quirk = self.batch.quirk
        return None if quirk is None else float(quirk.float().mean())


def compute_induction(cfg: InductionConfig, lm, *, batch_size=None, progress=False, keep_rows: int = VIEW_TRIALS
                      ) -> InductionResult:
    """Build the variant's trials for the loaded model ``lm`` and score them (nothing is written)."""
    variant = get_variant(cfg.variant)
    variant.check_model(lm)
    protocol = make_protocol(cfg.protocol, token_spec_for(lm))
    n = variant.n_for(cfg.protocol, cfg.seq_len)
    seq = check_length(variant, protocol, n, lm.max_positions)  # before anything big is built
    check_trials_fit(cfg.trials, seq, lm.n_layers, lm.n_heads, len(variant.targets))
    batch = build_batch(variant, protocol, cfg.trials, n, cfg.seed, max_positions=lm.max_positions)
    t1 = time.perf_counter()
    scores = induction_scores(lm, batch, batch_size=batch_size, progress=progress, keep_rows=keep_rows)
    return InductionResult(cfg, batch, scores, n, seq, lm.is_causal, {"extract_s": round(time.perf_counter() - t1, 3)})


def query_words(causal: bool) -> str:
    return "the repeated token" if causal else "[MASK]"


def write_induction(folder: Path, result: InductionResult, lm) -> list[str]:
    """scores.csv, trials.npz and one heatmap per target of ``result`` into ``folder``; the output names.
    ``lm``'s tokenizer names the tokens of the interactive view's rows."""
    cfg, batch, scores = result.config, result.batch, result.scores
    share_r0 = result.share_r0
    outputs = ["scores.csv", "trials.npz"]
    write_csv(folder / "scores.csv", SCORES_HEADER, score_rows(cfg.model, cfg.variant, cfg.protocol, scores,
                                                               "" if share_r0 is None else f"{share_r0:.6g}"))
    arrays = {"input_ids": batch.input_ids.numpy(), "mask_index": batch.mask_index.numpy()}
    if batch.quirk is not None:
        arrays["quirk"] = batch.quirk.numpy()
    for target, pos in batch.targets.items():
        arrays[f"target_index_{target}"] = pos.numpy()
        arrays[f"attention_{target}"] = scores.per_trial[target].numpy()
    if scores.rows is not None:
        arrays.update(view_arrays(lm, batch, scores.rows))
    with atomic_path(folder / "trials.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    for target, mean in scores.mean.items():
        name = figure_name(cfg.variant, target)
        induction_map(mean.numpy(), scores.sem[target].numpy(),
                      f"Induction map: {model_label(cfg.model)}, {cfg.variant} RRT ({cfg.protocol} protocol)\n"
                      f"attention from {query_words(result.causal)} to the {target_words(target, result.causal)}, "
                      f"{scores.n_trials} trials", folder / name)
        outputs.append(name)
    return outputs


def run_induction(cfg: InductionConfig, out_dir, *, lm=None, device="auto", batch_size=None,
                  progress=False, reuse=True) -> dict:
    """Run one induction experiment into ``out_dir``; reuse it if already finished with the same reuse key
    (config, model content, variant source, attnlab). ``lm``: a loaded model, a loader callable, or None."""
    variant = get_variant(cfg.variant)  # fail on a bad name before loading anything
    run, config, key, identity, meta = begin_run(out_dir, "induction", cfg, lm, reuse,
                                                 variant=source_fingerprint(variant.build))
    if meta:
        return meta
    t0 = time.perf_counter()
    lm = resolve_model(lm, cfg, device)
    identity["model"] = lm.fingerprint
    t_load = time.perf_counter() - t0
    result = compute_induction(cfg, lm, batch_size=batch_size, progress=progress)
    outputs = write_induction(run.stage(), result, lm)
    scores = result.scores
    note = PROTOCOL_NOTES.get(cfg.protocol, cfg.protocol)
    if result.causal:
        note = CAUSAL_NOTE
    return run.commit(key, config, outputs, identity, model=lm.meta, seq_len=result.seq_len,
                      sequence_tokens=result.sequence_tokens, protocol_note=note, causal=result.causal,
                      share_r0=result.share_r0,
                      n_trials=scores.n_trials, top_heads=top_heads(scores),
                      maps={t: {"mean": _rounded(scores.mean[t]), "sem": _rounded(scores.sem[t])} for t in scores.mean},
                      timings={"load_s": round(t_load, 3), **result.timings,
                               "total_s": round(time.perf_counter() - t0, 3)})


def add_parser(sub) -> None:
    p = sub.add_parser("induction", help="induction map of one model on one RRT variant",
                       description="Mask one token of a repeated random sequence and score the attention "
                                   "from [MASK] to the variant's targets, per layer and head.")
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or local folder (default: bert-base-uncased)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit); Hub ids only")
    _add_experiment_args(p)
    p.set_defaults(func=_run_one)

    s = sub.add_parser("induction-sweep", help="one induction map per model (Figure 9: BERT sizes)",
                       description="Run the same induction experiment on several models, one folder each.")
    s.add_argument("--models", default=",".join(FIGURE9_MODELS),
                   help=f"comma-separated ids or folders (default: {','.join(FIGURE9_MODELS)})")
    s.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="one Ray task per model on this cluster (pip install 'attnlab[ray]')")
    _add_experiment_args(s)
    s.set_defaults(func=_run_sweep)

    v = sub.add_parser("variants", help="list registered RRT variants and their targets")
    v.set_defaults(func=_list_variants)


def _add_experiment_args(p) -> None:
    names = ", ".join(v.name for v in list_variants())
    p.add_argument("--variant", default="standard", help=f"RRT variant ({names}; default: standard)")
    p.add_argument("--protocol", default="clean", choices=PROTOCOLS,
                   help="token protocol: clean (default; every target well defined) or paper (replicates its "
                        "code; what `reproduce` uses)")
    p.add_argument("--trials", type=int, default=50, help="number of random sequences (default: 50)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="length n of the random block X (default: 200, triple 150)")
    p.add_argument("--seed", type=int, default=0)
    add_output_args(p)
    add_runtime_args(p)


def _config(args, model) -> InductionConfig:
    return InductionConfig(model=model, variant=args.variant, protocol=args.protocol, trials=args.trials,
                           seq_len=args.seq_len, seed=args.seed, revision=getattr(args, "revision", None),
                           dtype=args.dtype)


def _run_one(args) -> int:
    cfg = _config(args, args.model)
    meta = run_induction(cfg, args.out, device=args.device, batch_size=args.batch_size,
                         progress=not args.no_progress, reuse=not args.force)
    # the protocol as it was applied to this model (a causal model is framed without [CLS]/[SEP]/[MASK])
    note = meta.get("protocol_note") or PROTOCOL_NOTES[cfg.protocol]
    print(f"induction: {note}" + ("" if cfg.protocol == "paper" or meta.get("causal") else
                                  "; `reproduce` uses the paper protocol"))
    print_wrote(meta, args.out)
    return 0


def sweep_folders(models: list[str], out) -> dict:
    """One output folder per model; distinct models never share one (a numbered suffix if names collide)."""
    folders, used = {}, set()
    for model in models:
        name = slug(model) or "model"
        candidate, i = name, 2
        while candidate in used:
            candidate, i = f"{name}-{i}", i + 1
        used.add(candidate)
        folders[model] = Path(out) / candidate
    return folders


def _run_sweep(args) -> int:
    from attnlab.core.errors import AttnlabError

    models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    if not models:
        raise InputError(f"models lists no model ({args.models!r}); give comma-separated ids or folders")
    if getattr(args, "ray", None):
        return _run_sweep_on_ray(args, models)
    failures = 0
    for model, out in sweep_folders(models, args.out).items():
        try:
            meta = run_induction(_config(args, model), out, device=args.device, batch_size=args.batch_size,
                                 progress=not args.no_progress, reuse=not args.force)
            print_wrote(meta, out)
        except AttnlabError as exc:
            failures += 1
            print(f"{model}: skipped: {exc}")
    return 1 if failures else 0


def _run_sweep_on_ray(args, models) -> int:
    """The sweep's per-model runs as Ray tasks (the same content-addressed jobs as ``mosaic --ray``)."""
    from dataclasses import asdict

    from attnlab.experiments.mosaic import MosaicConfig, run_jobs_on_ray

    cfg = MosaicConfig(models=models, variant=args.variant, protocol=args.protocol, trials=args.trials,
                       seq_len=args.seq_len, seed=args.seed, dtype=args.dtype)
    folders = sweep_folders(cfg.models, args.out)
    entries = run_jobs_on_ray(cfg.models, asdict(cfg), folders, args.ray, args.batch_size, not args.force)
    for entry in entries:
        if entry["status"] == "ok":
            print(f"{entry['model']}: {'reused finished run in' if entry['reused'] else 'wrote'} {folders[entry['model']]}")
        else:
            print(f"{entry['model']}: skipped: {entry['reason']}")
    return 1 if any(e["status"] != "ok" for e in entries) else 0


def _list_variants(args) -> int:
    for v in list_variants():
        print(f"{v.name:12s} targets: {', '.join(v.targets)}   models: {' and '.join(v.modes)}\n"
              f"{'':12s} {v.description}")
    return 0
