"""Induction maps (the paper's Figures 7-9): ``attnlab induction``, ``attnlab induction-sweep``, ``attnlab variants``.

Outputs of one run, in its output directory:
    scores.csv   tidy: model, variant, protocol, target, layer, head, mean, sem, n_trials
    trials.npz   input_ids [T,S], mask_index [T], target_index_<t> [T], attention_<t> [T,L,H]
    meta.json    model, resolved source, config, seed, versions, timings (written last = finished)
    induction_<variant>_<target>.png   one heatmap per target
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attnlab.core.models import load_model
from attnlab.core.outputs import atomic_path, finished, write_meta, write_text
from attnlab.experiments.common_args import add_runtime_args
from attnlab.figures.heatmap import head_heatmap
from attnlab.induction.protocols import PROTOCOLS, make_protocol, token_spec_for
from attnlab.induction.scores import induction_scores
from attnlab.induction.variants import build_batch, get_variant, list_variants

FIGURE9_MODELS = ["prajjwal1/bert-tiny", "prajjwal1/bert-small", "prajjwal1/bert-medium", "bert-large-uncased"]


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


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def model_label(model: str) -> str:
    """Short name for titles: Hub ids as they are, local folders by their last two path parts."""
    path = Path(model)
    return "/".join(path.parts[-2:]) if path.exists() else model


def figure_name(variant: str, target: str) -> str:
    return f"induction_{variant}_{target}.png"


def scores_csv(model: str, variant: str, protocol: str, scores) -> str:
    out = io.StringIO()
    out.write("model,variant,protocol,target,layer,head,mean,sem,n_trials\n")
    for target, mean in scores.mean.items():
        sem = scores.sem[target]
        for layer in range(mean.shape[0]):
            for head in range(mean.shape[1]):
                out.write(f"{model},{variant},{protocol},{target},{layer},{head},"
                          f"{mean[layer, head].item():.8g},{sem[layer, head].item():.8g},{scores.n_trials}\n")
    return out.getvalue()


def run_induction(cfg: InductionConfig, out_dir, *, lm=None, device="auto", batch_size=None,
                  progress=False, reuse=True) -> dict:
    """Run one induction experiment into ``out_dir``; reuse it if already finished with this config."""
    out_dir = Path(out_dir)
    variant = get_variant(cfg.variant)  # fail on a bad name before loading anything
    if cfg.trials < 1:
        from attnlab.core.errors import InputError

        raise InputError(f"--trials must be at least 1, got {cfg.trials}")
    config = asdict(cfg)
    if reuse and (meta := finished(out_dir, config)):
        return meta
    t0 = time.perf_counter()
    if lm is None:
        lm = load_model(cfg.model, device=device, dtype=cfg.dtype, revision=cfg.revision)
    t_load = time.perf_counter() - t0
    protocol = make_protocol(cfg.protocol, token_spec_for(lm))
    n = variant.n_for(cfg.protocol, cfg.seq_len)
    batch = build_batch(variant, protocol, cfg.trials, n, cfg.seed, max_positions=lm.max_positions)
    t1 = time.perf_counter()
    scores = induction_scores(lm, batch, batch_size=batch_size, progress=progress)
    t_run = time.perf_counter() - t1

    outputs = ["scores.csv", "trials.npz"]
    write_text(out_dir / "scores.csv", scores_csv(cfg.model, cfg.variant, cfg.protocol, scores))
    arrays = {"input_ids": batch.input_ids.numpy(), "mask_index": batch.mask_index.numpy()}
    for target, pos in batch.targets.items():
        arrays[f"target_index_{target}"] = pos.numpy()
        arrays[f"attention_{target}"] = scores.per_trial[target].numpy()
    with atomic_path(out_dir / "trials.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    for target, mean in scores.mean.items():
        name = figure_name(cfg.variant, target)
        head_heatmap(mean.numpy(), f"Induction scores: {model_label(cfg.model)}\nvariant {cfg.variant} ({cfg.protocol}), "
                     f"target '{target}', {cfg.trials} trials", out_dir / name, cbar_label="mean attention")
        outputs.append(name)
    return write_meta(out_dir, config, outputs, model=lm.meta, seq_len=n,
                      sequence_tokens=int(batch.input_ids.shape[1]),
                      timings={"load_s": round(t_load, 3), "extract_s": round(t_run, 3),
                               "total_s": round(time.perf_counter() - t0, 3)})


def add_parser(sub) -> None:
    p = sub.add_parser("induction", help="induction map of one model on one RRT variant",
                       description="Mask one token of a repeated random sequence and score the attention "
                                   "from [MASK] to the variant's targets, per layer and head.")
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or local folder (default: bert-base-uncased)")
    p.add_argument("--revision", default=None)
    _add_experiment_args(p)
    p.set_defaults(func=_run_one)

    s = sub.add_parser("induction-sweep", help="one induction map per model (Figure 9: BERT sizes)",
                       description="Run the same induction experiment on several models, one folder each.")
    s.add_argument("--models", default=",".join(FIGURE9_MODELS),
                   help=f"comma-separated ids or folders (default: {','.join(FIGURE9_MODELS)})")
    _add_experiment_args(s)
    s.set_defaults(func=_run_sweep)

    v = sub.add_parser("variants", help="list registered RRT variants and their targets")
    v.set_defaults(func=_list_variants)


def _add_experiment_args(p) -> None:
    names = ", ".join(v.name for v in list_variants())
    p.add_argument("--variant", default="standard", help=f"RRT variant ({names}; default: standard)")
    p.add_argument("--protocol", default="clean", choices=PROTOCOLS,
                   help="token protocol: clean (default; every target well defined) or paper (replicates its code)")
    p.add_argument("--trials", type=int, default=50, help="number of random sequences (default: 50)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="length n of the random block X (default: 200, triple 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_runtime_args(p)


def _config(args, model) -> InductionConfig:
    return InductionConfig(model=model, variant=args.variant, protocol=args.protocol, trials=args.trials,
                           seq_len=args.seq_len, seed=args.seed, revision=getattr(args, "revision", None),
                           dtype=args.dtype)


def _report(meta, out_dir) -> None:
    state = "reused finished run in" if meta.get("reused") else "wrote"
    print(f"{state} {out_dir}: " + ", ".join(meta["outputs"]))


def _run_one(args) -> int:
    meta = run_induction(_config(args, args.model), args.out, device=args.device, batch_size=args.batch_size,
                         progress=not args.no_progress)
    _report(meta, args.out)
    return 0


def _run_sweep(args) -> int:
    from attnlab.core.errors import AttnlabError

    failures = 0
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        out = Path(args.out) / slug(model)
        try:
            meta = run_induction(_config(args, model), out, device=args.device, batch_size=args.batch_size,
                                 progress=not args.no_progress)
            _report(meta, out)
        except AttnlabError as exc:
            failures += 1
            print(f"{model}: skipped: {exc}")
    return 1 if failures else 0


def _list_variants(args) -> int:
    for v in list_variants():
        print(f"{v.name:12s} targets: {', '.join(v.targets)}\n{'':12s} {v.description}")
    return 0
