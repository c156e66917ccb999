"""`attnlab mosaic`: many models' induction maps side by side; in-process and on a local Ray instance."""

import csv
import json
import shutil

import numpy as np
import pytest
from attnlab.experiments.cli import main
from attnlab.experiments.jobs import MosaicConfig
from attnlab.experiments.mosaic import compute_mosaic, write_mosaic
from conftest import run_cli, save_tiny_mlm
from families import tiny_family


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("zoo")
    save_tiny_mlm(root / "bert-mlm", bert_tokenizer)  # masked LM with a tokenizer
    tiny_family("llama").save_pretrained(root / "llama-tiny")  # causal, no tokenizer: config's special ids
    tiny_family("gpt_neox", seed=1).save_pretrained(root / "neox-tiny")
    return root


def _models(zoo):
    return [str(zoo / "bert-mlm"), str(zoo / "llama-tiny"), str(zoo / "neox-tiny"), str(zoo / "missing-model")]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mosaic_draws_every_model_that_runs_and_lists_the_failures(zoo, tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["mosaic", "--models", ",".join(_models(zoo)), "--out", str(out), "--trials", "3", "--seq-len", "10",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "missing-model: failed: model folder" in text and "3 of 4 models drawn" in text
    rows = {r["model"].rsplit("/", 1)[-1]: r for r in _read(out / "mosaic.csv")}
    assert rows["missing-model"]["status"] == "failed" and "does not exist" in rows["missing-model"]["reason"]
    assert rows["bert-mlm"]["target"] == "prev" and rows["bert-mlm"]["causal"] == "0"
    assert rows["llama-tiny"]["target"] == "after" and rows["llama-tiny"]["causal"] == "1"
    for name in ("bert-mlm", "llama-tiny", "neox-tiny"):
        r = rows[name]
        assert r["status"] == "ok" and int(r["parameters"]) > 0 and r["layers"] == "3"
        assert -1 <= float(r["best_lift"]) <= 1 and 0 <= float(r["best_relative_depth"]) <= 1
        assert r["named"] == ""  # random models: no head passes the verdict
    # each value is the per-model run's own map: the best lift of its scores.csv, with that head's mean
    per_model = _read(out / "models" / [p.name for p in (out / "models").iterdir() if "llama" in p.name][0] / "scores.csv")
    after = [r for r in per_model if r["target"] == "after"]
    best = max(after, key=lambda r: float(r["lift"]))
    assert float(rows["llama-tiny"]["best_lift"]) == pytest.approx(float(best["lift"]), rel=1e-5)
    assert float(rows["llama-tiny"]["best_mean"]) == pytest.approx(float(best["mean"]), rel=1e-5)
    assert float(rows["llama-tiny"]["chance"]) == pytest.approx(float(best["chance"]), rel=1e-5)
    for png in ("mosaic.png", "mosaic_summary.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses every finished model run and draws the same maps
    first = json.loads((out / "mosaic.json").read_text())
    capsys.readouterr()
    assert main(["mosaic", "--models", ",".join(_models(zoo)), "--out", str(out), "--trials", "3", "--seq-len", "10",
                 "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("(reused finished run)") == 3
    again = json.loads((out / "mosaic.json").read_text())
    assert [e["map"] for e in again["entries"]] == [e["map"] for e in first["entries"]]
    assert all(e["reused"] for e in again["entries"] if e["status"] == "ok")
    # `attnlab view` opens the mosaic: one interactive map per model that ran, each with its own run's data
    capsys.readouterr()
    assert main(["view", str(out)]) == 0
    page = (out / "view.html").read_text()
    assert f"wrote {out / 'view.html'}" in capsys.readouterr().out
    assert page.count("class='interactive'") == 3 and "<title>induction mosaic of 3 models" in page
    assert "prefix matching" in page and "previous instance of the masked token" in page  # causal and masked


def test_mosaic_with_no_model_that_runs_fails_with_the_reasons(tmp_path, capsys):
    rc = main(["mosaic", "--models", str(tmp_path / "nope"), "--out", str(tmp_path / "m"), "--device", "cpu",
               "--no-progress"])
    assert rc == 1 and "0 of 1 models drawn" in capsys.readouterr().out


def test_mosaic_on_local_ray_equals_the_in_process_run(zoo, tmp_path):
    ray = pytest.importorskip("ray")
    cfg = MosaicConfig(models=_models(zoo)[:3], trials=3, seq_len=10)
    here = compute_mosaic(cfg, tmp_path / "here", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = compute_mosaic(cfg, tmp_path / "ray", ray_address="auto")
        # induction-sweep runs the same jobs: on a shared file system its folders are the mosaic's runs' twins
        assert main(["induction-sweep", "--ray", "auto", "--models", ",".join(_models(zoo)[1:3]), "--trials", "3",
                     "--seq-len", "10", "--out", str(tmp_path / "sweep")]) == 0
    finally:
        ray.shutdown()
    sweep = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert len(sweep) == 2
    for name in sweep:
        got, want = _read(tmp_path / "sweep" / name / "scores.csv"), _read(tmp_path / "here" / "models" / name / "scores.csv")
        assert [(r["target"], r["layer"], r["head"]) for r in got] == [(r["target"], r["layer"], r["head"]) for r in want]
        np.testing.assert_allclose([float(r["mean"]) for r in got], [float(r["mean"]) for r in want], atol=1e-5, rtol=0)
    assert [e.status for e in remote.entries] == ["ok"] * 3
    # the same trials and the same arithmetic; Ray runs each task's torch with one thread and this process uses
    # more, so float32 sums may be taken in another order: equal to within float32 rounding, not bit for bit
    for a, b in zip(remote.entries, here.entries):
        np.testing.assert_allclose(np.array(a.map), np.array(b.map), atol=1e-5, rtol=0)
    assert [(e.model, e.target, e.parameters) for e in remote.entries] == [
        (e.model, e.target, e.parameters) for e in here.entries]
    assert "mosaic.png" in write_mosaic(tmp_path / "ray", remote)


def test_model_at_revision_names_a_hub_checkpoint(tmp_path):
    from attnlab.core.errors import InputError
    from attnlab.experiments.jobs import split_revision

    assert split_revision("EleutherAI/pythia-160m@step1000") == ("EleutherAI/pythia-160m", "step1000")
    assert split_revision("gpt2") == ("gpt2", None)
    odd = tmp_path / "model@v2"
    odd.mkdir()
    assert split_revision(str(odd)) == (str(odd), None)  # an existing folder is taken whole
    with pytest.raises(InputError, match="MODEL@REVISION"):
        split_revision("pythia@")
    cfg = MosaicConfig(models=["EleutherAI/pythia-160m@step1000"])
    assert cfg.induction_config(cfg.models[0]).revision == "step1000"


def test_ray_without_a_cluster_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["mosaic", "--models", str(tmp_path / "x"), "--ray", "auto", "--out", str(tmp_path / "m"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "could not reach a Ray cluster at 'auto'" in err and err.count("\n") == 1


def test_sweep_never_writes_two_models_into_one_folder(inside, capsys):
    shutil.copytree(inside / "mlm", inside / "tiny mlm", dirs_exist_ok=True)
    shutil.copytree(inside / "mlm", inside / "tiny_mlm", dirs_exist_ok=True)
    rc, out, _ = run_cli(["induction-sweep", "--models", "tiny_mlm,tiny mlm", "--out", "sweep", "--trials", "2",
                       "--seq-len", "10", "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0 and sorted(p.name for p in (inside / "sweep").iterdir()) == ["tiny_mlm", "tiny_mlm-2"]
    models = {json.loads((inside / "sweep" / d / "meta.json").read_text())["config"]["model"]
              for d in ("tiny_mlm", "tiny_mlm-2")}
    assert models == {"tiny_mlm", "tiny mlm"}
