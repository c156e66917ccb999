"""Run folders and the one runner: reuse keyed on what determines a result, verified outputs, one run at a time,
nothing touched outside the folder or another run's files, nothing left behind by a failed run."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import save_tiny_mlm
from planted import planted_lag_bert

from attnlab.core.models import wrap_model
from attnlab.core.runs import run_experiment
from attnlab.experiments.cli import main
from attnlab.induction.experiment import INDUCTION, InductionConfig


def _cli(*args):
    return main([*map(str, args), "--no-progress", "--device", "cpu"])


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
    assert _cli("induction", "--model", tmp_path / "no-such-model", "--out", out) == 2
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert _cli("induction", "--model", tmp_path / "no-such-model", "--out", existing) == 2
    # an existing folder stays, without a file of the failed run (its hidden run lock may stay, as lock files do)
    assert existing.is_dir() and [p.name for p in existing.iterdir()] in ([], [".attnlab-lock"])
    assert _cli("reproduce", "--only", "figure99", "--out", tmp_path / "r") == 2 and not (tmp_path / "r").exists()


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
    assert _cli(*args) == 0
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
        rc = _cli(*args)
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
