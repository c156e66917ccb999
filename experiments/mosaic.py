"""``attnlab mosaic``: the standard RRT induction map of many models, side by side, as lift over the null.

Every model is an independent, content-addressed job (``experiments/jobs.py``): its induction run goes into
``OUT/models/<name>/`` and is reused when its reuse key is unchanged; here or one Ray task per model. The mosaic
itself is redrawn each time from those runs' results:

    mosaic.png          one small map per model of the lift (attention minus the null), layers at relative depth,
                        one colour scale for all; the heads the verdict names are outlined
    mosaic_summary.png  each model's largest lift vs its parameter count
    mosaic.csv          one row per model: chance, its best head by lift with mean and lift, the named heads - or
                        why it failed
    mosaic.json         the same, with each model's maps

Which map: masked LMs, attention from [MASK] to the previous instance of the masked token (``prev``, the paper's
induction map); causal models, attention from a repeated token to the token that followed its previous instance
(``after``, Olsson et al.'s prefix matching). Lift, not raw attention, is drawn: a random model's uniform
attention (1 / keys, larger for short causal contexts) is not an induction head.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from attnlab.experiments.common_args import add_output_args, add_runtime_args
from attnlab.experiments.jobs import ModelEntry, MosaicConfig, add_job_args, config_from, run_jobs, sweep_folders

MOSAIC_HEADER = ["model", "status", "family", "causal", "target", "layers", "heads", "parameters", "chance",
                 "best_layer", "best_head", "best_mean", "best_lift", "best_relative_depth", "named", "n_trials",
                 "reason"]


@dataclass
class MosaicResult:
    config: MosaicConfig
    entries: list[ModelEntry]
    timings: dict

    @property
    def drawn(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.status == "ok"]

    @property
    def failed(self) -> list[ModelEntry]:
        return [e for e in self.entries if e.status != "ok"]


def compute_mosaic(cfg: MosaicConfig, out_dir, *, device="auto", batch_size=None, reuse=True,
                   ray_address: str | None = None, progress: bool = False) -> MosaicResult:
    """Every model's induction run (here, or on Ray at ``ray_address``: "auto", "local" or an address)."""
    t0 = time.perf_counter()
    folders = sweep_folders(cfg.models, Path(out_dir) / "models")
    entries = run_jobs(cfg, folders, device=device, batch_size=batch_size, reuse=reuse, ray_address=ray_address,
                       progress=progress)
    return MosaicResult(cfg, [ModelEntry(**e) for e in entries], {"total_s": round(time.perf_counter() - t0, 3)})


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"


def mosaic_rows(result: MosaicResult):
    for e in result.entries:
        best = e.best
        layers, heads = (len(e.map), len(e.map[0])) if e.map else ("", "")
        mean = e.mean[best[0]][best[1]] if best else None
        yield [e.model, e.status, e.family, "" if e.causal is None else int(e.causal), e.target, layers, heads,
               "" if e.parameters is None else e.parameters, _num(e.chance),
               *(("", "", "", "", "") if best is None else
                 (best[0], best[1], _num(mean), _num(best[2]), f"{best[0] / max(1, layers - 1):.4g}")),
               " ".join(e.named), "" if e.n_trials is None else e.n_trials, e.reason]


def write_mosaic(folder: Path, result: MosaicResult) -> list[str]:
    """mosaic.csv, mosaic.json and (when any model ran) mosaic.png and mosaic_summary.png into ``folder``."""
    import numpy as np

    from attnlab.core.names import model_label
    from attnlab.core.outputs import write_csv, write_json
    from attnlab.figures.heatmap import small_multiples
    from attnlab.figures.mosaic import best_vs_parameters

    write_csv(folder / "mosaic.csv", MOSAIC_HEADER, mosaic_rows(result))
    write_json(folder / "mosaic.json", {"config": asdict(result.config), "timings": result.timings,
                                        "entries": [asdict(e) for e in result.entries]})
    outputs = ["mosaic.csv", "mosaic.json"]
    drawn = result.drawn
    if drawn:
        cfg = result.config
        panels = [(model_label(e.model), np.array([[np.nan if v is None else v for v in row] for row in e.map]))
                  for e in drawn]
        outlines = [[(int(h[1:].split("H")[0]), int(h.split("H")[1])) for h in e.named] for e in drawn]
        subtitles = [("causal: prefix matching" if e.causal else "masked: [MASK] -> previous instance")
                     + f"\nnamed: {', '.join(e.named[:3]) or 'none'}" for e in drawn]
        small_multiples(panels, f"Induction mosaic: lift over the null, {cfg.variant} RRT ({cfg.protocol} protocol), "
                        f"{cfg.trials} trials per model", folder / "mosaic.png", subtitles=subtitles,
                        cbar_label="lift = attention - null", outlines=outlines,
                        outline_note=f"outlined: heads the verdict names (lift >= {cfg.min_lift:g}, CI above the null, "
                                     "no trial carrying half)")
        best_vs_parameters([(model_label(e.model), e.parameters, e.best[2] if e.best else float("nan"), bool(e.causal))
                            for e in drawn], folder / "mosaic_summary.png")
        outputs += ["mosaic.png", "mosaic_summary.png"]
    return outputs


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("mosaic", help="one induction map per model, side by side, at relative depth",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True,
                   help="comma-separated Hub ids or local folders; MODEL@REVISION picks a Hub revision, e.g. the "
                        "Pythia training checkpoints EleutherAI/pythia-160m@step1000,EleutherAI/pythia-160m@step143000 "
                        "(required)")
    add_job_args(p)
    add_output_args(p, help_out="output folder (each model's own run goes to OUT/models/NAME/)")
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from attnlab.core.outputs import RunFolder
    from attnlab.induction.variants import get_variant

    cfg = config_from(args, args.models.split(","))
    get_variant(cfg.variant)  # a typo fails before any model is loaded
    with RunFolder(args.out, "mosaic") as run:
        result = compute_mosaic(cfg, run.path, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                                ray_address=args.ray, progress=not args.no_progress)
        outputs = write_mosaic(run.stage(), result)
        run.commit(f"mosaic-{time.time_ns()}", asdict(cfg), outputs, drawn=len(result.drawn),
                   entries=len(result.entries))
    for e in result.entries:
        if e.status == "ok":
            layer, head, lift = e.best
            print(f"{e.model}: largest lift L{layer}H{head} {lift:.3f} ({'prefix matching' if e.causal else 'induction'}"
                  f", chance {e.chance:.3g}); named: {', '.join(e.named) or 'none'}"
                  + (" (reused finished run)" if e.reused else ""))
        else:
            print(f"{e.model}: failed: {e.reason}")
    print(f"wrote {run.path}: {', '.join(outputs)} ({len(result.drawn)} of {len(result.entries)} models drawn)")
    return 0 if result.drawn else 1
