"""The command line: fast, torch-free help; every option's default stated; environment faults and non-finite
models as one-line errors (exit 2), the previous finished run intact."""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import save_tiny_mlm, tiny_bert

from attnlab.experiments.cli import main


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def _cli(*args):
    return main([*map(str, args), "--no-progress", "--device", "cpu"])


# ---------------------------------------------------------------- fast start, stated defaults


def test_help_and_usage_errors_never_import_torch():
    code = ("import sys, contextlib, io\nfrom attnlab.experiments import cli\n"
            "for argv in (['--help'], ['induction', '--help'], ['geometry', 'umap', '--help'], ['mosaic', '--help'],"
            " ['reproduce', '--help'], ['induction', '--trials', 'x'], ['nonsense'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: cli.main(argv)\n"
            "        except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_help_answers_in_under_a_second():
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "attnlab.experiments.cli", "--help"], capture_output=True,
                              text=True, env=_env(), timeout=60)
        times.append(time.perf_counter() - t0)
        assert proc.returncode == 0 and "reproduce" in proc.stdout
    assert statistics.median(times) < 1.0, times


def test_version_and_every_option_states_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "attnlab 0.1.0"
    from attnlab.experiments.cli import build_parser

    parser = build_parser()
    checked = 0
    for action in parser._subparsers._group_actions[0].choices.items():
        name, sub = action
        stack = [sub]
        while stack:
            p = stack.pop()
            for a in p._actions:
                if a.option_strings and a.dest not in ("help",) and a.help is not None:
                    assert "(default:" in a.help or "(required)" in a.help, (name, a.option_strings, a.help)
                    checked += 1
                if getattr(a, "choices", None) and isinstance(a.choices, dict):
                    stack += list(a.choices.values())
    assert checked > 100


# ---------------------------------------------------------------- environment faults


@pytest.fixture(scope="module")
def model(tmp_path_factory, bert_tokenizer):
    return save_tiny_mlm(tmp_path_factory.mktemp("m") / "mlm", bert_tokenizer, layers=2, heads=2)


def test_disk_full_is_one_line_and_the_finished_run_stays(tmp_path, model):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attnlab.experiments.cli", "induction", "--model", str(model), "--trials", "3",
           "--seq-len", "10", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert subprocess.run(cmd, env=_env(), capture_output=True, timeout=120).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}

    def small_files():  # `ulimit -f`: writing past 8 KB fails (Python ignores SIGXFSZ, so as EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = subprocess.run(cmd + ["--force"], env=_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "File too large" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "reused finished run" in again.stdout  # intact and verified


def test_a_300_character_folder_name_is_one_line(tmp_path, model, capsys):
    assert _cli("induction", "--model", model, "--trials", 2, "--seq-len", 10, "--out", tmp_path / ("a" * 300)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "File name too long" in err


# ---------------------------------------------------------------- non-finite models


def _nan_model(folder, bert_tokenizer):
    model = tiny_bert(masked_lm=True, vocab_size=bert_tokenizer.vocab_size, layers=2, heads=2, positions=512)
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


def test_nan_weights_are_named_and_the_other_models_still_drawn(tmp_path, model, bert_tokenizer, capsys):
    nan = _nan_model(tmp_path / "nan-model", bert_tokenizer)
    assert _cli("induction", "--model", nan, "--trials", 2, "--seq-len", 10, "--out", tmp_path / "i") == 2
    err = capsys.readouterr().err
    assert "non-finite attention" in err and "L1H" in err and err.count("\n") == 1
    rc = _cli("mosaic", "--models", f"{nan},{model}", "--trials", 2, "--seq-len", 10, "--out", tmp_path / "mo")
    out = capsys.readouterr().out
    assert rc == 0 and "1 of 2 models drawn" in out and "non-finite attention" in out
    from conftest import write_corpus

    corpus = write_corpus(tmp_path / "c.jsonl.gz")
    assert _cli("icl", "--model", nan, "--corpus", corpus, "--trials", 2, "--out", tmp_path / "icl") == 2
    assert "non-finite losses" in capsys.readouterr().err


def test_a_mosaic_whose_models_all_fail_keeps_no_old_figure(tmp_path, model, capsys):
    out = tmp_path / "mosaic"
    assert _cli("mosaic", "--models", model, "--trials", 2, "--seq-len", 10, "--out", out) == 0
    assert (out / "mosaic.png").is_file()
    assert _cli("mosaic", "--models", tmp_path / "missing", "--trials", 2, "--seq-len", 10, "--out", out) == 1
    assert not (out / "mosaic.png").exists() and not (out / "mosaic_summary.png").exists()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["drawn"] == 0 and sorted(meta["outputs"]) == ["mosaic.csv", "mosaic.json"]


def test_ablate_refuses_heads_that_are_not_whole_numbers(model):
    import attnlab
    from attnlab.core.errors import InputError
    from attnlab.core.models import load_model

    lm = load_model(str(model), masked_lm=True, device="cpu")
    for heads in ([(0.5, 0)], [(True, 0)], [(0, 7)], [("0", 0)], [(0,)]):
        with pytest.raises(InputError):
            with attnlab.ablate(lm, heads=heads):
                pass


@pytest.mark.parametrize("command", [
    "heads --trials 1000000000", "ablate --heads L0H0 --trials 1000000000", "ablate --scan --trials 1000000000",
    "heads --seq-len 100000000",
])
def test_impossible_heads_and_ablate_work_fails_fast(tmp_path, model, capsys, command):
    t0 = time.perf_counter()
    rc = _cli(*command.split(), "--model", model, "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and ("use at most about" in err or "lower seq_len" in err), err
    assert time.perf_counter() - t0 < 15
