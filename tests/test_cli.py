"""The command line: fast, torch-free help; every option's default stated; environment faults and non-finite
models as one-line errors (exit 2), the previous finished run intact."""

import json
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from attnlab.experiments.cli import main
from conftest import (
    cli,
    cli_cmd,
    cli_env,
    default_sigint,
    run_cli,
    save_tiny_mlm,
    tiny_bert,
    write_corpus,
)

# ---------------------------------------------------------------- fast start, stated defaults


def test_help_and_usage_errors_never_import_torch():
    code = ("import sys, contextlib, io\nfrom attnlab.experiments import cli\n"
            "for argv in (['--help'], ['induction', '--help'], ['geometry', 'umap', '--help'], ['mosaic', '--help'],"
            " ['reproduce', '--help'], ['induction', '--trials', 'x'], ['nonsense'], ['--version']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: cli.main(argv)\n"
            "        except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_help_answers_in_under_a_second():
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "attnlab.experiments.cli", "--help"], capture_output=True,
                              text=True, env=cli_env(), timeout=60)
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
    assert subprocess.run(cmd, env=cli_env(), capture_output=True, timeout=120).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}

    def small_files():  # `ulimit -f`: writing past 8 KB fails (Python ignores SIGXFSZ, so as EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = subprocess.run(cmd + ["--force"], env=cli_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "File too large" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    again = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "reused finished run" in again.stdout  # intact and verified


def test_a_300_character_folder_name_is_one_line(tmp_path, model, capsys):
    assert cli("induction", "--model", model, "--trials", 2, "--seq-len", 10, "--out", tmp_path / ("a" * 300)) == 2
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
    assert cli("induction", "--model", nan, "--trials", 2, "--seq-len", 10, "--out", tmp_path / "i") == 2
    err = capsys.readouterr().err
    assert "non-finite attention" in err and "L1H" in err and err.count("\n") == 1
    rc = cli("mosaic", "--models", f"{nan},{model}", "--trials", 2, "--seq-len", 10, "--out", tmp_path / "mo")
    out = capsys.readouterr().out
    assert rc == 0 and "1 of 2 models drawn" in out and "non-finite attention" in out

    corpus = write_corpus(tmp_path / "c.jsonl.gz")
    assert cli("icl", "--model", nan, "--corpus", corpus, "--trials", 2, "--out", tmp_path / "icl") == 2
    assert "non-finite losses" in capsys.readouterr().err


def test_a_mosaic_whose_models_all_fail_keeps_no_old_figure(tmp_path, model, capsys):
    out = tmp_path / "mosaic"
    assert cli("mosaic", "--models", model, "--trials", 2, "--seq-len", 10, "--out", out) == 0
    assert (out / "mosaic.png").is_file()
    assert cli("mosaic", "--models", tmp_path / "missing", "--trials", 2, "--seq-len", 10, "--out", out) == 1
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
    rc = cli(*command.split(), "--model", model, "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and ("use at most about" in err or "lower seq_len" in err), err
    assert time.perf_counter() - t0 < 15


ONE_LINE_ERRORS = [
    # tracebacks where a message belongs
    ("induction --model trunc --out o --trials 2 --seq-len 10", "could not load model from local folder 'trunc'"),
    ("induction --model shapes --out o --trials 2 --seq-len 10", "weights that match it"),
    ("induction --model notok --out o --trials 2 --seq-len 10", "has no tokenizer files"),
    ("icl --model notok --corpus corpus.jsonl.gz --out o --trials 2", "no tokenizer"),
    ("patterns --model notok --words dog --out o", "has no tokenizer files"),
    ("induction --model mlm --device bogus --out o", "unknown device 'bogus'"),
    ("induction --model mlm --device mps --out o", "device 'mps' is not supported"),
    ("icl --model mlm --corpus corpus.jsonl.gz --out o --batch-size -1", "must be at least 1, got -1"),
    ("geometry scaling --model mlm --corpus corpus.jsonl.gz --constants 1e300 --out o", "[1e-6, 1e6]"),
    ("patterns --model mlm --words dog --layers 5-2 --out o", "runs backwards"),
    ("patterns --model mlm --words= --out o", "words lists no word"),
    ("patterns --model mlm --words , --out o", "words lists no word"),
    (["patterns", "--model", "mlm", "--words", "dog", "--sentence", "dog " * 600, "--out", "o"],
     "more than the model's 512 positions"),
    ("icl --model mlm --corpus trunc.jsonl.gz --out o --trials 2", "is truncated"),
    ("--plugin syntax_plugin.py variants", "syntax error at line 1"),
    ("--plugin import_plugin.py variants", "No module named 'no_such_module_xyz'"),
    ("--plugin dup_plugin.py variants", "variant 'standard' is already registered"),
    ("--plugin none_plugin.py induction --model mlm --variant nonev --out o --trials 2 --seq-len 10", "returned NoneType"),
    ("--plugin shape_plugin.py induction --model mlm --variant shapev --out o --trials 2 --seq-len 10", "has shape"),
    ("--plugin past_plugin.py induction --model mlm --variant pastv --out o --trials 2 --seq-len 10",
     "mask_index must hold one position per trial inside"),
    ("reproduce --out afile", "is a file, not a folder"),
    # silent wrong output, now refused
    ("--plugin beyond_plugin.py induction --model mlm --variant beyondv --out o --trials 2 --seq-len 10",
     "lies outside the 12-token sequence"),
    ("--plugin float_plugin.py induction --model mlm --variant floatv --out o --trials 2 --seq-len 10",
     "positions must be integers"),
    ("patterns --model mlm --words \U0001f642 --strict --out o", "is not in the vocabulary"),
    ("induction --model mlm --revision v1 --out o --trials 2 --seq-len 10", "applies to Hub ids only"),
    ("induction --model models/not-here --out o", "no folder 'models/not-here' exists here"),
    ("induction --model empty --out o", "has no config.json"),
    ("icl --model mlm --corpus bad.jsonl --out o --trials 2", "line 5 is not valid JSON"),
    ("induction-sweep --models , --out o", "models lists no model"),
    ("induction --model mlm --out= --trials 2 --seq-len 10", "the output folder is empty"),
    ("geometry scaling --model mlm --corpus corpus.jsonl.gz --max-tokens 600 --sentences 3 --out o",
     "max_tokens 600 exceeds the model's 512 positions"),
]


@pytest.mark.parametrize("command, message", ONE_LINE_ERRORS, ids=[str(c[0])[:60] for c in ONE_LINE_ERRORS])
def test_bad_input_gets_one_clear_line(inside, capsys, command, message):
    args = command.split() if isinstance(command, str) else list(command)
    if "--model" in args and "--device" not in args:
        args += ["--device", "cpu"]
    rc, out, err = run_cli(args, capsys)
    assert rc == 2, (out, err)
    assert "Traceback" not in err and message in err, err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert not (inside / "o" / "meta.json").exists()  # nothing half-written that looks finished


@pytest.mark.parametrize("command, message", [
    ("induction --model mlm --protocol paper --seq-len 100000 --out o", "lower seq_len to at most 255"),
    ("induction --model mlm --trials 1000000000 --out o --seq-len 10", "use at most about"),
    ("icl --model mlm --corpus corpus.jsonl.gz --trials 100000000 --out o", "use at most about"),
    ("induction --model mlm --out afile --trials 2 --seq-len 10", "is a file, not a folder"),
    ("induction --model mlm --out afile/sub --trials 2 --seq-len 10", "lies under afile, which is a file"),
    ("induction --model mlm --out /proc/attnlab-out --trials 2 --seq-len 10", "cannot write into output folder"),
])
def test_impossible_work_fails_fast(inside, capsys, command, message):
    t0 = time.perf_counter()
    rc, _, err = run_cli(command.split() + ["--no-progress", "--device", "cpu"], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert time.perf_counter() - t0 < 15


def test_a_plugin_named_twice_is_loaded_once(inside, capsys, monkeypatch):
    example = str(Path(__file__).resolve().parents[1] / "examples" / "gap_variant.py")
    monkeypatch.setenv("ATTNLAB_PLUGINS", example)
    rc, out, err = run_cli(["--plugin", example, "--plugin", example, "variants"], capsys)
    assert rc == 0 and out.count("gap ") == 1 and "error" not in err
    from attnlab.induction.variants import _REGISTRY

    _REGISTRY.pop("gap", None)


def test_sigint_prints_one_line_and_exits_130(inside):
    proc = subprocess.Popen(cli_cmd("induction", "--model", "mlm", "--trials", 400, "--seq-len", 200,
                                     "--out", inside / "sigint"), cwd=inside, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    t0 = time.monotonic()
    while proc.poll() is None and not (inside / "sigint").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err, err
    # 130, or (rarely, seen under load) death by SIGINT after the handler printed its line and returned 130:
    # a shell reports both as $? = 130, and either way the interrupt was handled and said in one line
    assert rc in (130, -signal.SIGINT), rc
    assert not (inside / "sigint" / "meta.json").exists()


def test_interrupt_inside_an_extension_import_is_still_an_interrupt(monkeypatch, capsys):
    """Ctrl-C during a C extension's import (matplotlib's Agg) surfaces as an ImportError caused by
    the KeyboardInterrupt; the CLI must still exit 130 with its one line, and real errors must still raise."""
    import argparse

    from attnlab.experiments import cli

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    def plain_bug(args):
        raise ImportError("a real bug")

    for func, expected in [(interrupted_import, 130), (plain_bug, ImportError)]:
        ns = argparse.Namespace(func=func, verbose=False, command="induction", plugin=[])
        monkeypatch.setattr(cli, "build_parser", lambda ns=ns: type("P", (), {"parse_args": lambda self, a: ns})())
        if expected == 130:
            assert cli.main([]) == 130
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "interrupted" in err
        else:
            with pytest.raises(ImportError, match="a real bug"):
                cli.main([])


def test_progress_is_plain_lines_off_a_terminal(capsys):
    from attnlab.core.progress import _PlainLines, bar

    assert isinstance(bar(range(3), desc="x"), _PlainLines)  # pytest captures stderr: not a terminal
    assert list(_PlainLines(range(3), "induction", 3, every_s=0)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("induction: ") == 3 and "\r" not in err and "\x1b[" not in err


_RETAINED = """
import numpy as np

def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

def handed_back():  # bytes the process gives back to the system when a 64 MiB array is freed
    a = np.ones(1 << 23)
    held = rss()
    del a
    return held - rss()
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's malloc and /proc")
@pytest.mark.parametrize("entry", ["attnlab.experiments.cli:run", "attnlab.core.plotworker:_init"])
def test_attnlab_processes_keep_large_freed_blocks_and_a_library_import_does_not(entry):
    """The command line and the plot worker keep freed arrays for reuse (a fresh mmap zeroed by the kernel for each
    large temporary cost the main job 13 s of system time); importing attnlab leaves the allocator alone."""
    module, name = entry.split(":")
    code = _RETAINED + f"""
import sys
import attnlab.experiments.cli as cli
import {module} as entry
default = handed_back()  # attnlab imported, nothing applied: a library import changes nothing
cli.main = lambda argv=None: print(default, handed_back()) or 0  # run() calls main(): measure inside it
entry.{name}() if entry.__name__ != "attnlab.experiments.cli" else cli.run()
if entry.__name__ != "attnlab.experiments.cli":
    print(default, handed_back())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    default, tuned = (int(v) for v in out.stdout.split())
    assert default > 60 * 2**20, "a freed 64 MiB array is handed back by default"
    assert tuned < 4 * 2**20, f"{entry} still hands {tuned / 2**20:.0f} MiB back on free"
