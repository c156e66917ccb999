"""``attnlab mosaic``: the standard RRT induction map of many models, side by side.

Every model is an independent, content-addressed job: ``run_induction`` into ``OUT/models/<name>/``, reused
when its reuse key (config, model content, variant source, attnlab) is unchanged. Jobs run here one after the
other, or on a Ray cluster (``ray_address``: one Ray task per model, ``num_gpus=1`` when the cluster has GPUs);
the results come back to this process, which draws them:

    mosaic.png          one small heatmap per model, layers at relative depth, one colour scale for all
    mosaic_summary.png  each model's strongest head vs its parameter count
    mosaic.csv          one row per model: its best head, score, relative depth - or why it failed
    mosaic.json         the same, with each model's map

Which map: masked LMs, attention from [MASK] to the previous instance of the masked token (``prev``, the
paper's induction map); causal models, attention from a repeated token to the token that followed its previous
instance (``after``, Olsson et al.'s prefix matching). The ``target`` column says which.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnlab.core.errors import AttnlabError, InputError
from attnlab.core.models import model_label
from attnlab.core.outputs import check_out_dir, write_csv, write_json
from attnlab.experiments.common_args import add_output_args, add_runtime_args, positive_int
from attnlab.experiments.induction import InductionConfig, run_induction, sweep_folders

MOSAIC_TARGET = {False: "prev", True: "after"}  # masked LM -> induction; causal -> prefix matching
MOSAIC_HEADER = ["model", "status", "family", "causal", "target", "layers", "heads", "parameters", "best_layer",
                 "best_head", "best_score", "best_relative_depth", "n_trials", "reason"]


@dataclass
class MosaicConfig:
    models: list[str] = field(default_factory=list)
    variant: str = "standard"
    protocol: str = "clean"
    trials: int = 50
    seq_len: int | None = None
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self):
        self.models = list(dict.fromkeys(str(m).strip() for m in self.models if str(m).strip()))
        if not self.models:
            raise InputError("models lists no model; give one or more Hub ids or folders, comma-separated")
        # the per-model configs validate the rest (and every MODEL@REVISION) before any model is loaded
        for model in self.models:
            self.induction_config(model)

    def induction_config(self, model: str) -> InductionConfig:
        name, revision = split_revision(model)
        return InductionConfig(model=name, variant=self.variant, protocol=self.protocol, trials=self.trials,
                               seq_len=self.seq_len, seed=self.seed, revision=revision, dtype=self.dtype)


def split_revision(model: str) -> tuple[str, str | None]:
    """``"EleutherAI/pythia-160m@step1000"`` -> (``"EleutherAI/pythia-160m"``, ``"step1000"``): one Hub model at
    several training checkpoints in one mosaic. A local path that itself contains '@' is taken whole."""
    if "@" not in model or Path(model).expanduser().exists():
        return model, None
    name, revision = model.rsplit("@", 1)
    if not name or not revision:
        raise InputError(f"cannot read {model!r} as MODEL@REVISION; write e.g. EleutherAI/pythia-160m@step1000")
    return name, revision


@dataclass
class ModelEntry:
    """One model's row of the mosaic: its map when it ran, the reason when it did not."""

    model: str
    status: str  # "ok" | "failed"
    reason: str = ""
    family: str = ""
    causal: bool | None = None
    target: str = ""
    parameters: int | None = None
    n_trials: int | None = None
    map: list | None = None  # [L, H] mean attention to the target
    reused: bool = False  # the model's finished run was reused, not recomputed

    @property
    def best(self) -> tuple[int, int, float] | None:
        if self.map is None:
            return None
        values = np.array(self.map, dtype=float)
        if not np.isfinite(values).any():
            return None
        layer, head = np.unravel_index(np.nanargmax(values), values.shape)
        return int(layer), int(head), float(values[layer, head])


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


def induction_job(model: str, cfg: dict, out_dir: str, device: str = "auto", batch_size=None,
                  reuse: bool = True) -> dict:
    """One model's job (here or in a Ray task): its induction run, reduced to a :class:`ModelEntry` dict.
    Errors a user can act on come back as a failed entry with the reason, never as an exception."""
    mosaic_cfg = MosaicConfig(**cfg)
    try:
        meta = run_induction(mosaic_cfg.induction_config(model), out_dir, device=device, batch_size=batch_size,
                             reuse=reuse)
    except AttnlabError as exc:
        return asdict(ModelEntry(model, "failed", reason=" ".join(str(exc).split())))
    causal = bool(meta.get("causal", False))
    target = MOSAIC_TARGET[causal]
    if target not in meta["maps"]:
        return asdict(ModelEntry(model, "failed", reason=f"variant {mosaic_cfg.variant!r} has no {target!r} target"))
    info = meta.get("model", {})
    return asdict(ModelEntry(model, "ok", family=info.get("model_type", ""), causal=causal, target=target,
                             parameters=info.get("parameters"), n_trials=meta.get("n_trials"),
                             map=meta["maps"][target]["mean"], reused=bool(meta.get("reused"))))


def run_jobs_on_ray(models, cfg: dict, folders: dict, address: str, batch_size, reuse: bool) -> list[dict]:
    """:func:`induction_job` of every model as one Ray task (``mosaic`` and ``induction-sweep``); the entries in
    the models' order. Connects to ``address`` ("auto", an address, or "local": start one) unless Ray is up."""
    try:
        import ray
    except ImportError:
        raise InputError("ray_address needs Ray, which is not installed; pip install 'attnlab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise InputError(f"could not reach a Ray cluster at {address!r} ({' '.join(str(exc).split())[:160]}); "
                             "start one with `ray start --head`, give its address, or use --ray local") from None
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_gpus=gpus, max_retries=0)(induction_job)
        device = "cuda" if gpus else "cpu"
        refs = [remote.remote(m, cfg, str(folders[m]), device, batch_size, reuse) for m in models]
        out = []
        for model, ref in zip(models, refs):
            try:
                out.append(ray.get(ref))
            except Exception as exc:  # a worker crash: that model fails, the rest are drawn
                cause = getattr(exc, "cause", None) or exc
                out.append(asdict(ModelEntry(model, "failed", reason=f"{type(cause).__name__}: {cause}"[:300])))
        return out
    finally:
        if started:
            ray.shutdown()


def compute_mosaic(cfg: MosaicConfig, out_dir, *, device="auto", batch_size=None, reuse=True,
                   ray_address: str | None = None, progress: bool = False) -> MosaicResult:
    """Every model's induction run (here, or on Ray at ``ray_address``: "auto", "local" or an address)."""
    t0 = time.perf_counter()
    folders = sweep_folders(cfg.models, Path(out_dir) / "models")
    job_cfg = asdict(cfg)
    if ray_address:
        entries = run_jobs_on_ray(cfg.models, job_cfg, folders, ray_address, batch_size, reuse)
    else:
        models = cfg.models
        if progress:
            from attnlab.core.progress import bar

            models = bar(models, desc="mosaic", unit="model", total=len(models))
        entries = [induction_job(m, job_cfg, str(folders[m]), device, batch_size, reuse) for m in models]
    return MosaicResult(cfg, [ModelEntry(**e) for e in entries], {"total_s": round(time.perf_counter() - t0, 3)})


def mosaic_rows(result: MosaicResult):
    for e in result.entries:
        best = e.best
        layers, heads = (len(e.map), len(e.map[0])) if e.map else ("", "")
        yield [e.model, e.status, e.family, "" if e.causal is None else int(e.causal), e.target, layers, heads,
               "" if e.parameters is None else e.parameters,
               *(("", "", "", "") if best is None else
                 (best[0], best[1], f"{best[2]:.6g}", f"{best[0] / max(1, layers - 1):.4g}")),
               "" if e.n_trials is None else e.n_trials, e.reason]


def write_mosaic(folder: Path, result: MosaicResult) -> list[str]:
    """mosaic.csv, mosaic.json and (when any model ran) mosaic.png and mosaic_summary.png into ``folder``."""
    from attnlab.figures.heatmap import small_multiples
    from attnlab.figures.mosaic import best_vs_parameters

    write_csv(folder / "mosaic.csv", MOSAIC_HEADER, mosaic_rows(result))
    write_json(folder / "mosaic.json", {"config": asdict(result.config), "timings": result.timings,
                                        "entries": [asdict(e) for e in result.entries]})
    outputs = ["mosaic.csv", "mosaic.json"]
    drawn = result.drawn
    if drawn:
        cfg = result.config
        panels = [(model_label(e.model), np.array(e.map, dtype=float)) for e in drawn]
        subtitles = [("causal: prefix matching" if e.causal else "masked: [MASK] -> previous instance") for e in drawn]
        small_multiples(panels, f"Induction mosaic: {cfg.variant} RRT ({cfg.protocol} protocol), {cfg.trials} trials "
                        "per model", folder / "mosaic.png", subtitles=subtitles)
        best_vs_parameters([(model_label(e.model), e.parameters, e.best[2] if e.best else float("nan"), bool(e.causal))
                            for e in drawn], folder / "mosaic_summary.png")
        outputs += ["mosaic.png", "mosaic_summary.png"]
    return outputs


def add_parser(sub) -> None:
    p = sub.add_parser("mosaic", help="one induction map per model, side by side, at relative depth",
                       description=__doc__.split("Which map")[0])
    p.add_argument("--models", required=True,
                   help="comma-separated Hub ids or local folders; MODEL@REVISION picks a Hub revision, e.g. the "
                        "Pythia training checkpoints EleutherAI/pythia-160m@step1000,EleutherAI/pythia-160m@step143000")
    p.add_argument("--variant", default="standard", help="RRT variant (default: standard)")
    p.add_argument("--protocol", default="clean", choices=["clean", "paper"])
    p.add_argument("--trials", type=positive_int, default=50)
    p.add_argument("--seq-len", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run one Ray task per model on this cluster (auto: the running one; local: start one "
                        "here); needs pip install 'attnlab[ray]'")
    add_output_args(p, help_out="output folder (each model's own run goes to OUT/models/NAME/)")
    add_runtime_args(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = MosaicConfig(models=args.models.split(","), variant=args.variant, protocol=args.protocol,
                       trials=args.trials, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype)
    from attnlab.induction.variants import get_variant

    get_variant(cfg.variant)  # a typo fails before any model is loaded
    out = check_out_dir(args.out)
    result = compute_mosaic(cfg, out, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                            ray_address=args.ray, progress=not args.no_progress)
    outputs = write_mosaic(Path(out), result)
    for e in result.entries:
        if e.status == "ok":
            layer, head, score = e.best
            print(f"{e.model}: L{layer}H{head} {score:.3f} ({'prefix matching' if e.causal else 'induction'})"
                  + (" (reused finished run)" if e.reused else ""))
        else:
            print(f"{e.model}: failed: {e.reason}")
    print(f"wrote {out}: {', '.join(outputs)} ({len(result.drawn)} of {len(result.entries)} models drawn)")
    return 0 if result.drawn else 1
