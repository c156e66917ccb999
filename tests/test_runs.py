"""Run folders and the one runner: reuse keyed on what determines a result, verified outputs, one run at a time,
nothing touched outside the folder or another run's files, nothing left behind by a failed run."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from attnlab.core.models import wrap_model
from attnlab.core.runs import run_experiment
from attnlab.experiments.cli import main
from attnlab.induction.experiment import INDUCTION, InductionConfig
from conftest import (
    cli,
    cli_cmd,
    cli_env,
    default_sigint,
    np_load,
    run_cli,
    save_tiny_mlm,
    write_corpus,
)
from planted import planted_lag_bert


@pytest.fixture(scope="module")
def lm():
    return wrap_model(planted_lag_bert(lag=10, heads=2))


CFG = InductionConfig(model="planted", trials=3, seq_len=10)


# ---------------------------------------------------------------- reuse keyed on the science, derived


def _copy_package(tmp_path):
    from attnlab.core.provenance import package_root

    root = tmp_path / "attnlab"
    shutil.copytree(package_root(), root, ignore=shutil.ignore_patterns("tests", "benchmarks", "docs", "examples",
                                                                        ".git", "*.pyc", "__pycache__"))
    return root


def test_code_fingerprint_covers_every_science_module_and_no_drawing(tmp_path, monkeypatch):
    """Derived from the package: editing icl/ or circuits/ (once forgotten in a hand-kept list) changes the
    science fingerprint; editing figures/ or experiments/ changes only what draws."""
    from attnlab.core import provenance

    root = _copy_package(tmp_path)
    monkeypatch.setattr(provenance, "package_root", lambda: root)

    def fingerprints():
        provenance.code_fingerprint.cache_clear()
        provenance.render_fingerprint.cache_clear()
        return provenance.code_fingerprint(), provenance.render_fingerprint()

    science, render = fingerprints()
    for edited in ("icl/score.py", "circuits/scores.py", "induction/scores.py", "core/extractor.py", "geometry/study.py"):
        (root / edited).write_text((root / edited).read_text() + "\n# edited\n")
        new_science, new_render = fingerprints()
        assert new_science != science and new_render == render, edited
        science = new_science
    for edited in ("figures/heatmap.py", "experiments/report.py"):
        (root / edited).write_text((root / edited).read_text() + "\n# edited\n")
        new_science, new_render = fingerprints()
        assert new_science == science, edited
        assert new_render != render or edited.startswith("experiments"), edited
        render = new_render
    provenance.code_fingerprint.cache_clear()
    provenance.render_fingerprint.cache_clear()


def test_changed_drawing_code_redraws_from_the_saved_results_without_recomputing(tmp_path, lm, monkeypatch):
    from attnlab.core import runs
    from attnlab.induction import maps

    first = run_experiment(INDUCTION, CFG, tmp_path, lm=lm)
    png = tmp_path / first["figures"]["prev"]
    os.utime(png, (0, 0))
    monkeypatch.setattr(runs, "render_key", lambda exp: "other drawing code")
    monkeypatch.setattr(maps, "compute", lambda *a, **k: pytest.fail("recomputed"))
    again = run_experiment(INDUCTION, CFG, tmp_path, lm=lm)
    assert again["reused"] and again["render"] == "other drawing code" and again["reuse_key"] == first["reuse_key"]
    assert png.stat().st_mtime > 0  # drawn again
    for name in ("scores.csv", "trials.npz"):  # the data are the first run's, byte for byte
        assert again["files"][name] == first["files"][name]
    assert run_experiment(INDUCTION, CFG, tmp_path, lm=lm)["reused"]  # and now it is simply reused


# ---------------------------------------------------------------- figures drawn in the plot worker


@pytest.fixture(scope="module")
def plotter():
    from attnlab.core.plotworker import Plotter

    with Plotter() as p:
        yield p


def test_figures_drawn_in_the_plot_worker_are_the_files_drawn_here(tmp_path, lm, plotter):
    from attnlab.core.runs import start_experiment

    here = run_experiment(INDUCTION, CFG, tmp_path / "here", lm=lm)
    pending = start_experiment(INDUCTION, CFG, tmp_path / "there", lm=lm, plotter=plotter)
    assert pending.meta["config"]["trials"] == 3 and not (tmp_path / "there" / "meta.json").exists()
    there = pending.result()
    assert there["timings"]["plot_s"] > 0 and there["figures"] == here["figures"]
    for name in here["figures"].values():
        assert (tmp_path / "there" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    assert there["files"] == here["files"]


def test_a_plot_worker_that_dies_leaves_the_figures_to_this_process(tmp_path, lm):
    from attnlab.core.plotworker import Plotter
    from attnlab.core.runs import start_experiment

    with Plotter() as p:
        p._pool.submit(os._exit, 1)  # the worker dies before it draws
        meta = start_experiment(INDUCTION, CFG, tmp_path, lm=lm, plotter=p).result()
    assert meta["figures"] and all((tmp_path / f).is_file() for f in meta["figures"].values())


def test_a_closed_plotter_leaves_no_pool_thread_running_into_interpreter_exit():
    """close() waits for the pool's manager thread, even while the worker still warms up: left running, Python
    3.11's exit hook could write to the wake-up pipe the thread was closing (a traceback at exit, seen once)."""
    from attnlab.core.plotworker import Plotter

    p = Plotter()
    manager, dispatcher = p._pool._executor_manager_thread, p._thread
    p.close()  # at once: the worker is still importing matplotlib
    assert manager is not None and not manager.is_alive() and not dispatcher.is_alive()


def test_an_error_while_drawing_in_the_worker_commits_nothing(tmp_path, lm, plotter):
    import dataclasses

    from attnlab.core.runs import start_experiment

    broken = dataclasses.replace(INDUCTION, plot="attnlab.core.outputs:no_such_function")
    pending = start_experiment(broken, CFG, tmp_path, lm=lm, plotter=plotter)
    with pytest.raises(AttributeError):
        pending.result()
    assert not (tmp_path / "meta.json").exists() and not any(p.name.startswith(".") and p.is_dir()
                                                              for p in tmp_path.iterdir())
    assert run_experiment(INDUCTION, CFG, tmp_path, lm=lm)["figures"]  # the folder is free again


# ---------------------------------------------------------------- finished means verified


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete"])
def test_a_damaged_output_is_recomputed_never_served(tmp_path, lm, damage):
    first = run_experiment(INDUCTION, CFG, tmp_path, lm=lm)
    target = tmp_path / ("trials.npz" if damage == "truncate" else "scores.csv")
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "empty":
        target.write_text("")
    else:
        target.unlink()
    again = run_experiment(INDUCTION, CFG, tmp_path, lm=lm)
    assert not again.get("reused")
    assert again["files"] == first["files"]  # seeded: the same bytes again
    assert np.load(tmp_path / "trials.npz")["input_ids"].shape == (3, 22)


# ---------------------------------------------------------------- nothing outside the folder, nothing lost


def test_a_forced_rerun_deletes_only_its_own_plain_files(tmp_path, lm):
    out, victim = tmp_path / "run", tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "victim_dir").mkdir()
    run_experiment(INDUCTION, CFG, out, lm=lm)
    meta = json.loads((out / "meta.json").read_text())
    meta["outputs"] += ["../victim.txt", str(victim), "../victim_dir"]
    (out / "meta.json").write_text(json.dumps(meta))
    (out / ".attnlab-swap.json").write_text(json.dumps({"files": ["../victim.txt", str(victim), "/etc/hostname"]}))
    run_experiment(INDUCTION, CFG, out, lm=lm, reuse=False)
    assert victim.read_text() == "precious" and (tmp_path / "victim_dir").is_dir()


def test_plugin_names_that_would_leave_the_folder_are_refused():
    from attnlab.core.errors import InputError
    from attnlab.induction import register_variant

    for name, targets in (("../../x", ["prev"]), ("ok", ["../../x"]), ("ok", ["a/b"]), (".hidden", ["prev"]),
                          ("ok", [".."]), ("ok", [])):
        with pytest.raises(InputError, match="rename it|no target"):
            register_variant(name, targets)(lambda p, t, n, g: None)


def test_model_names_become_plain_folder_names():
    from attnlab.experiments.jobs import slug, sweep_folders

    for name in ("..", ".", "../../etc", "/abs/path", "a" * 400, "x/../../y", ""):
        s = slug(name)
        assert s and s not in (".", "..") and "/" not in s and not s.startswith(".") and len(s) <= 100, name
    folders = sweep_folders(["..", "../", "a" * 300, "a" * 300 + "b"], "/out")
    assert len({str(f) for f in folders.values()}) == 4
    assert all(str(f.parent) == "/out" for f in folders.values())


def test_a_staging_folder_that_is_a_symlink_is_removed_not_followed(tmp_path, lm):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out.mkdir()
    (out / ".attnlab-staging").symlink_to(elsewhere)
    meta = run_experiment(INDUCTION, CFG, out, lm=lm)
    assert "scores.csv" in meta["outputs"] and (elsewhere / "keep.txt").read_text() == "mine"


def test_a_failed_command_leaves_no_folder_it_created(tmp_path, capsys):
    out = tmp_path / "new" / "deeper"
    assert cli("induction", "--model", tmp_path / "no-such-model", "--out", out) == 2
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli("induction", "--model", tmp_path / "no-such-model", "--out", existing) == 2
    # an existing folder stays, without a file of the failed run (its hidden run lock may stay, as lock files do)
    assert existing.is_dir() and [p.name for p in existing.iterdir()] in ([], [".attnlab-lock"])
    assert cli("reproduce", "--only", "figure99", "--out", tmp_path / "r") == 2 and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- one run at a time


def test_a_second_run_into_a_busy_folder_gets_one_line_naming_the_holder(tmp_path, bert_tokenizer):
    from attnlab.core.outputs import folder_lock

    folder = save_tiny_mlm(tmp_path / "m", bert_tokenizer, layers=2, heads=2)
    out = tmp_path / "busy"
    out.mkdir()
    with folder_lock(out):
        proc = subprocess.run([sys.executable, "-m", "attnlab.experiments.cli", "induction", "--model", str(folder),
                               "--trials", "2", "--seq-len", "10", "--out", str(out), "--device", "cpu",
                               "--no-progress"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "in use by another attnlab run (pid" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (out / "meta.json").exists()
    proc = subprocess.run([sys.executable, "-m", "attnlab.experiments.cli", "induction", "--model", str(folder),
                           "--trials", "2", "--seq-len", "10", "--out", str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr  # released: the folder is free again


def test_two_runs_started_together_never_mix(tmp_path, bert_tokenizer):
    """Before: one run's meta.json beside the other's scores, the loser with a traceback, and the mixed folder reused
    later as finished. Now one wins, the other says the folder is busy; what is there is one whole run."""
    folder = save_tiny_mlm(tmp_path / "m", bert_tokenizer, layers=2, heads=2)
    out = tmp_path / "race"
    cmds = [[sys.executable, "-m", "attnlab.experiments.cli", "induction", "--model", str(folder), "--trials",
             str(trials), "--seq-len", "10", "--out", str(out), "--device", "cpu", "--no-progress"] for trials in (3, 5)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    assert all("Traceback" not in err for _, err in results)
    assert sorted(rc for rc, _ in results) in ([0, 0], [0, 2])
    meta = json.loads((out / "meta.json").read_text())
    z = np.load(out / "trials.npz")
    assert z["input_ids"].shape[0] == meta["config"]["trials"]  # the scores are the meta's run's


# ---------------------------------------------------------------- meta.json of any shape


FIELDS = ["experiment", "outputs", "reuse_key", "config", "files", "identity", "maps", "verdict", "top_heads",
          "causal", "n_trials", "figures", "data", "render"]
VALUES = [None, 7, "text", [], {}, [1, "x"], {"a": 1}, True, ["../x"]]


def test_meta_json_fields_of_any_type_never_give_a_traceback(tmp_path, bert_tokenizer, capsys):
    """Fuzz: every field of a finished run's meta.json set to every wrong type. Opening the folder for a rerun
    never raises anything but a one-line InputError and never serves the damaged run; `view` answers in one line;
    a rerun through the command line recomputes."""
    from attnlab.core.errors import InputError
    from attnlab.core.outputs import RunFolder

    folder = save_tiny_mlm(tmp_path / "m", bert_tokenizer, layers=2, heads=2)
    out = tmp_path / "run"
    args = ("induction", "--model", folder, "--trials", 2, "--seq-len", 10, "--out", out)
    assert cli(*args) == 0
    good = json.loads((out / "meta.json").read_text())
    bad_metas = [dict(good, **{field: value}) for field in FIELDS for value in VALUES]
    for bad in bad_metas:
        (out / "meta.json").write_text(json.dumps(bad))
        try:
            with RunFolder(out, "induction", slot={"variant": "standard"}) as run:
                assert run.finished(good["reuse_key"]) is None
        except InputError as exc:
            assert "\n" not in str(exc)
        capsys.readouterr()
        rc = main(["view", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, (bad, err)
    for bad in bad_metas[::17]:  # a few reruns end to end: recomputed, never a traceback
        (out / "meta.json").write_text(json.dumps(bad))
        rc = cli(*args)
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err, err
        assert rc == 2 or json.loads((out / "meta.json").read_text())["config"]["trials"] == 2
        (out / "meta.json").write_text(json.dumps(good))
    for shape in ("dir", "notjson", "list"):
        meta = out / "meta.json"
        meta.unlink()
        if shape == "dir":
            meta.mkdir()
        else:
            meta.write_text("{nope" if shape == "notjson" else "[1, 2]")
        for argv in (["view", str(out)], ["induction", "--model", str(folder), "--trials", "2", "--seq-len", "10",
                                          "--out", str(out), "--device", "cpu", "--no-progress"]):
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc in (0, 2) and "Traceback" not in err, (shape, argv[0], err)
        if meta.is_dir():
            meta.rmdir()
        meta.write_text(json.dumps(good))


def _kill_when(proc, path: Path, sig, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if path.exists():
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("experiment, sig", [("induction", signal.SIGKILL), ("induction", signal.SIGINT),
                                             ("icl", signal.SIGKILL)])
def test_interrupted_rerun_never_mixes_two_runs(inside, capsys, experiment, sig):
    out = inside / f"int-{experiment}-{int(sig)}"
    if experiment == "induction":
        base = ["induction", "--model", "mlm", "--seq-len", "10", "--out", out]
        first, marker, table, n_col = [*base, "--trials", "2"], "scores.csv", "scores.csv", "n_trials"
        second = [*base, "--trials", "3"]
    else:
        base = ["icl", "--model", "mlm", "--corpus", "corpus.jsonl.gz", "--out", out]
        first, marker, table, n_col = [*base, "--trials", "2"], "icl.csv", "icl.csv", None
        second = [*base, "--trials", "3"]
    assert main([*map(str, first), "--device", "cpu", "--no-progress"]) == 0
    before = (out / table).read_bytes()
    (out / ".induction_standard_prev.png.x1y2.attnlab-tmp.png").write_bytes(b"stale")  # a killed write's leftover
    proc = subprocess.Popen(cli_cmd(*second), cwd=inside, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)
    rc = _kill_when(proc, out / ".attnlab-staging" / marker, sig)
    err = proc.stderr.read()
    if sig == signal.SIGINT:
        assert rc == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    else:
        assert rc == -signal.SIGKILL
    assert (out / table).read_bytes() == before  # the finished run is untouched
    capsys.readouterr()
    assert main([*map(str, first), "--device", "cpu", "--no-progress"]) == 0
    assert "reused finished run" in capsys.readouterr().out
    assert not list(out.glob(".*attnlab-tmp*")) and not (out / ".attnlab-staging").exists()
    rows = list(csv.DictReader(open(out / table)))
    summary = json.loads((out / "meta.json").read_text())
    if n_col:
        assert {r[n_col] for r in rows} == {"2"}
    else:
        assert len(rows) == 2 == summary["summary"]["n"]


def test_interrupted_swap_is_rolled_back(tmp_path):
    from attnlab.core.outputs import SWAP_MARKER, RunFolder

    (tmp_path / "scores.csv").write_text("half of a new run")
    (tmp_path / "old.png").write_text("from the run before")
    (tmp_path / SWAP_MARKER).write_text(json.dumps({"files": ["scores.csv", "old.png"]}))  # meta.json already gone
    with RunFolder(tmp_path, "induction"):
        pass
    assert not (tmp_path / "scores.csv").exists() and not (tmp_path / "old.png").exists()
    assert not (tmp_path / SWAP_MARKER).exists()


def test_edited_plugin_is_not_reused(inside):
    plugin = inside / "edited_plugin.py"
    source = (Path(__file__).resolve().parents[1] / "examples" / "gap_variant.py").read_text()
    plugin.write_text(source)
    out = inside / "plugin-run"
    cmd = cli_cmd("--plugin", plugin, "induction", "--model", "mlm", "--variant", "gap", "--seq-len", 12,
                   "--trials", 3, "--out", out)
    first = subprocess.run(cmd, cwd=inside, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, cwd=inside, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "reused finished run" in again.stdout
    before = np_load(out / "trials.npz")["input_ids"].shape
    plugin.write_text(source.replace("GAP = 10", "GAP = 4"))  # the builder changed
    edited = subprocess.run(cmd, cwd=inside, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert edited.returncode == 0 and "reused" not in edited.stdout
    assert np_load(out / "trials.npz")["input_ids"].shape[1] == before[1] - 6


def test_another_experiment_in_the_same_folder_is_refused(inside, capsys):
    out = inside / "shared-out"
    assert run_cli(["induction", "--model", "mlm", "--out", str(out), "--trials", "2", "--seq-len", "10",
                 "--device", "cpu", "--no-progress"], capsys)[0] == 0
    files = sorted(p.name for p in out.iterdir())
    rc, _, err = run_cli(["icl", "--model", "mlm", "--corpus", "corpus.jsonl.gz", "--out", str(out), "--trials", "2",
                       "--device", "cpu"], capsys)
    assert rc == 2 and "holds a finished 'induction' run" in err
    assert sorted(p.name for p in out.iterdir()) == files


def test_a_run_of_another_variant_never_deletes_the_first_runs_files(inside, capsys):
    """Before, a `triple` run into a folder holding a `standard` run silently deleted the standard files."""
    out = inside / "variants-out"
    common = ["--model", "mlm", "--out", str(out), "--trials", "2", "--seq-len", "10", "--device", "cpu", "--no-progress"]
    assert run_cli(["induction", "--variant", "standard", *common], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    for extra in ([], ["--force"]):
        rc, _, err = run_cli(["induction", "--variant", "triple", *common, *extra], capsys)
        assert rc == 2 and "variant 'standard'" in err and "another folder" in err and err.count("\n") == 1
        assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    rc, out_text, _ = run_cli(["induction", "--variant", "standard", *common, "--force"], capsys)
    assert rc == 0 and out_text.splitlines()[-1].startswith("wrote") and "meta.json" in out_text


def _layers_heads(path):
    rows = list(csv.DictReader(open(path / "scores.csv")))
    return {int(r["layer"]) for r in rows}, {int(r["head"]) for r in rows}


def test_overwritten_model_folder_is_not_reused(tmp_path, bert_tokenizer, capsys):
    folder, out = tmp_path / "model", tmp_path / "run"
    args = ["induction", "--model", folder, "--trials", 2, "--seq-len", 10, "--out", out]
    save_tiny_mlm(folder, bert_tokenizer, layers=2, heads=2)
    assert cli(*args) == 0 and _layers_heads(out) == ({0, 1}, {0, 1})
    save_tiny_mlm(folder, bert_tokenizer, layers=4, heads=4, seed=1)  # another model, same folder
    capsys.readouterr()
    assert cli(*args) == 0
    assert capsys.readouterr().out.startswith("induction: ") and _layers_heads(out) == ({0, 1, 2, 3}, {0, 1, 2, 3})
    assert cli(*args) == 0 and "reused finished run" in capsys.readouterr().out  # unchanged now: reused
    meta = json.loads((out / "meta.json").read_text())
    assert meta["identity"]["model"].startswith("folder:") and "attnlab" in meta["identity"]


def test_edited_corpus_and_new_attnlab_are_not_reused(tmp_path, bert_tokenizer, monkeypatch, capsys):
    from attnlab.core import provenance

    folder, corpus, out = save_tiny_mlm(tmp_path / "m", bert_tokenizer), tmp_path / "c.jsonl.gz", tmp_path / "g"
    write_corpus(corpus)
    args = ["geometry", "scaling", "--model", folder, "--corpus", corpus, "--sentences", 6, "--bootstrap", 0,
            "--no-continuous", "--out", out]
    assert cli(*args) == 0
    assert cli(*args) == 0 and "reused finished run" in capsys.readouterr().out
    before = json.loads((out / "sentences.json").read_text())
    write_corpus(corpus, seed=1)  # same name, other text
    assert cli(*args) == 0 and "reused" not in capsys.readouterr().out
    assert json.loads((out / "sentences.json").read_text()) != before
    monkeypatch.setattr(provenance, "code_fingerprint", lambda: "9.9.9+other")
    assert cli(*args) == 0 and "reused" not in capsys.readouterr().out


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_respect_the_umask(tmp_path, umask, mode):
    from attnlab.core.models import wrap_model
    from attnlab.core.runs import run_experiment
    from attnlab.induction.experiment import INDUCTION, InductionConfig
    from planted import planted_lag_bert

    old = os.umask(umask)
    try:
        meta = run_experiment(INDUCTION, InductionConfig(model="planted", trials=2, seq_len=10), tmp_path,
                             lm=wrap_model(planted_lag_bert(lag=10, heads=2)))
    finally:
        os.umask(old)
    for name in meta["outputs"] + ["meta.json"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_a_new_experiment_is_one_science_module_and_one_record(tmp_path, bert_tokenizer, capsys):
    """The worked example of docs/experiments.md, end to end: a plugin file registers a record; the command line
    gains a subcommand with generated options, the runner gives it a run folder, reuse (keyed on the plugin's own
    source too) and meta.json."""
    from pathlib import Path

    from attnlab.core import runs

    example = Path(__file__).resolve().parents[1] / "examples" / "entropy_experiment.py"
    plugin = tmp_path / "entropy_plugin.py"
    plugin.write_text(example.read_text())
    folder = save_tiny_mlm(tmp_path / "m", bert_tokenizer, layers=2, heads=2)
    out = tmp_path / "run"
    args = ["--plugin", str(plugin), "entropy", "--model", str(folder), "--trials", "3", "--seq-len", "10",
            "--out", str(out), "--device", "cpu", "--no-progress"]
    try:
        assert main(args) == 0
        text = capsys.readouterr().out
        assert "entropy: sharpest head L" in text and "uniform attention: 3.091" in text  # log(22)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["experiment"] == "entropy" and meta["identity"]["record"] and "entropy.csv" in meta["outputs"]
        assert main(args) == 0 and "reused finished run" in capsys.readouterr().out
        plugin.write_text(example.read_text().replace("1e-30", "1e-29"))  # the science changed
        from attnlab.experiments import cli

        cli._LOADED_PLUGINS.clear()
        runs._PLUGIN_RECORDS.clear()
        assert main(args) == 0 and "reused" not in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main(["--plugin", str(plugin), "entropy", "--help"])
        assert "(default: 16)" in capsys.readouterr().out
    finally:
        runs._PLUGIN_RECORDS.clear()
        from attnlab.experiments import cli

        cli._LOADED_PLUGINS.clear()
