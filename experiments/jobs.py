"""Many runs of one experiment: ``attnlab induction-sweep`` (one model per folder, here or on Ray), the mosaic's
per-model jobs, and ``attnlab variants``.

Every model is an independent, content-addressed job: the induction record run into its own folder, reused when
its reuse key (config, model content, variant source, attnlab's science code) is unchanged. Jobs run here one
after the other, or on a Ray cluster (one Ray task per model, ``num_gpus=1`` when the cluster has GPUs).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attnlab.core.config import option
from attnlab.core.errors import AttnlabError, InputError
from attnlab.experiments.common_args import add_output_args, add_runtime_args
from attnlab.experiments.paper import FIGURE9_MODELS
from attnlab.induction.experiment import MIN_LIFT, PROTOCOLS, InductionConfig

MOSAIC_TARGET = {False: "prev", True: "after"}  # masked LM -> induction; causal -> prefix matching


def slug(text: str, limit: int = 100) -> str:
    """A folder name for a model: letters, digits, '_', '-', '.', never hidden or '..', at most ``limit``
    characters (a longer name keeps its start and a digest of the whole)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.")
    name = re.sub(r"\.{2,}", ".", name)
    if len(name) > limit:
        name = name[:limit - 13].rstrip("_.") + "-" + hashlib.sha256(str(text).encode()).hexdigest()[:12]
    return name or "model"


def sweep_folders(models: list[str], out) -> dict:
    """One output folder per model; distinct models never share one (a numbered suffix if names collide)."""
    folders, used = {}, set()
    for model in models:
        name = slug(model)
        candidate, i = name, 2
        while candidate in used:
            candidate, i = f"{name}-{i}", i + 1
        used.add(candidate)
        folders[model] = Path(out) / candidate
    return folders


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
class MosaicConfig:
    models: list = field(default_factory=list)
    variant: str = option("standard", "RRT variant (list them with `attnlab variants`)")
    protocol: str = option("clean", "token protocol", choices=PROTOCOLS)
    trials: int = option(50, "number of random sequences per model", minimum=1)
    seq_len: int | None = option(None, "length n of the random block X", minimum=3, show_default="200; triple 150")
    seed: int = option(0, "random seed")
    min_lift: float = option(MIN_LIFT, "the verdict names a head when its lift over the null is at least this")
    dtype: str = option("float32", "model dtype", choices=("float32", "bfloat16", "float16"))

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
                               seq_len=self.seq_len, seed=self.seed, min_lift=self.min_lift, revision=revision,
                               dtype=self.dtype)


@dataclass
class ModelEntry:
    """One model's row of a mosaic: its maps and verdict when it ran, the reason when it did not."""

    model: str
    status: str  # "ok" | "failed"
    reason: str = ""
    family: str = ""
    causal: bool | None = None
    target: str = ""
    parameters: int | None = None
    n_trials: int | None = None
    map: list | None = None  # [L, H] lift over the null: what the mosaic draws
    mean: list | None = None  # [L, H] mean attention to the target
    chance: float | None = None
    named: list = field(default_factory=list)  # the heads the verdict names
    reused: bool = False  # the model's finished run was reused, not recomputed

    @property
    def best(self) -> tuple[int, int, float] | None:
        """(layer, head, lift) of the head with the largest lift."""
        import numpy as np

        if self.map is None:
            return None
        values = np.array([[np.nan if v is None else v for v in row] for row in self.map], dtype=float)
        if not np.isfinite(values).any():
            return None
        layer, head = np.unravel_index(np.nanargmax(values), values.shape)
        return int(layer), int(head), float(values[layer, head])


def induction_job(model: str, cfg: dict, out_dir: str, device: str = "auto", batch_size=None,
                  reuse: bool = True) -> dict:
    """One model's job (here or in a Ray task): its induction run, reduced to a :class:`ModelEntry` dict.
    Errors a user can act on come back as a failed entry with the reason, never as an exception."""
    from attnlab.core.runs import run_experiment
    from attnlab.induction.experiment import INDUCTION

    mosaic_cfg = MosaicConfig(**cfg)
    try:
        meta = run_experiment(INDUCTION, mosaic_cfg.induction_config(model), out_dir, device=device,
                              batch_size=batch_size, reuse=reuse)
    except AttnlabError as exc:
        return asdict(ModelEntry(model, "failed", reason=" ".join(str(exc).split())))
    except OSError as exc:
        return asdict(ModelEntry(model, "failed", reason=f"cannot read or write {exc.filename or ''}: "
                                                         f"{exc.strerror or exc}"))
    causal = bool(meta.get("causal", False))
    target = MOSAIC_TARGET[causal]
    if target not in meta["maps"]:
        return asdict(ModelEntry(model, "failed", reason=f"variant {mosaic_cfg.variant!r} has no {target!r} target"))
    info = meta.get("model", {})
    maps = meta["maps"][target]
    return asdict(ModelEntry(model, "ok", family=info.get("model_type", ""), causal=causal, target=target,
                             parameters=info.get("parameters"), n_trials=meta.get("n_trials"), map=maps["lift"],
                             mean=maps["mean"], chance=maps.get("chance"), named=meta["verdict"][target]["heads"],
                             reused=bool(meta.get("reused"))))


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


def run_jobs(cfg: MosaicConfig, folders: dict, *, device="auto", batch_size=None, reuse=True,
             ray_address: str | None = None, progress: bool = False) -> list[dict]:
    """Every model's job, here one after the other or on Ray; entries in the models' order."""
    job_cfg = asdict(cfg)
    if ray_address:
        return run_jobs_on_ray(cfg.models, job_cfg, folders, ray_address, batch_size, reuse)
    models = cfg.models
    if progress:
        from attnlab.core.progress import bar

        models = bar(models, desc="models", unit="model", total=len(models))
    return [induction_job(m, job_cfg, str(folders[m]), device, batch_size, reuse) for m in models]


def add_job_args(p) -> None:
    """The per-model settings of a sweep or mosaic, generated from :class:`MosaicConfig`."""
    from attnlab.core.config import add_config_args

    add_config_args(p, MosaicConfig, skip=("models",))
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="one Ray task per model on this cluster (auto: the running one; local: start one here); "
                        "needs pip install 'attnlab[ray]' (default: run here)")


def config_from(args, models: list[str]) -> MosaicConfig:
    from attnlab.core.config import config_from_args

    return config_from_args(MosaicConfig, args, models=models)


def add_parser(sub) -> None:
    s = sub.add_parser("induction-sweep", help="one induction map per model (Figure 9: BERT sizes)",
                       description="Run the same induction experiment on several models, one folder each "
                                   "(OUT/<model name>/), here or one Ray task per model.")
    s.add_argument("--models", default=",".join(FIGURE9_MODELS),
                   help=f"comma-separated ids or folders; MODEL@REVISION picks a Hub revision (default: "
                        f"{','.join(FIGURE9_MODELS)})")
    add_job_args(s)
    add_output_args(s)
    add_runtime_args(s)
    s.set_defaults(func=_run_sweep)
    v = sub.add_parser("variants", help="list registered RRT variants and their targets",
                       description="The RRT variants attnlab knows (plugins included) and their targets.")
    v.set_defaults(func=_list_variants)


def _run_sweep(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise InputError(f"models lists no model ({args.models!r}); give comma-separated ids or folders")
    cfg = config_from(args, models)
    from attnlab.induction.variants import get_variant

    get_variant(cfg.variant)  # a typo fails before any model is loaded
    folders = sweep_folders(cfg.models, args.out)
    entries = run_jobs(cfg, folders, device=args.device, batch_size=args.batch_size, reuse=not args.force,
                       ray_address=args.ray, progress=not args.no_progress)
    for entry in entries:
        out = folders[entry["model"]]
        if entry["status"] == "ok":
            named = ", ".join(entry["named"]) or "none"
            print(f"{entry['model']}: induction heads named ({entry['target']}): {named}; "
                  f"{'reused finished run in' if entry['reused'] else 'wrote'} {out}")
        else:
            print(f"{entry['model']}: skipped: {entry['reason']}")
    return 1 if any(e["status"] != "ok" for e in entries) else 0


def _list_variants(args) -> int:
    from attnlab.induction.variants import list_variants

    for v in list_variants():
        print(f"{v.name:12s} targets: {', '.join(v.targets)}   models: {' and '.join(v.modes)}\n"
              f"{'':12s} {v.description}")
    return 0
