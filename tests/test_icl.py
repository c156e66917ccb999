"""ICL score: the paper protocol equals a transcription of the notebook loop; masked-token equals by-hand CE."""

import csv
import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from attnlab.core.corpus import Document, load_corpus
from attnlab.core.errors import CorpusError, MissingHeadError
from attnlab.core.models import wrap_model
from attnlab.core.runs import run_experiment
from attnlab.icl import draw_trials, icl_trials, tokenize_lengths
from attnlab.icl.experiment import ICL, ICLConfig
from conftest import run_cli, tiny_bert


@pytest.fixture(scope="module")
def tokenizer(bert_tokenizer):
    return bert_tokenizer  # bert-base-uncased's vocabulary (conftest; skips without the MiniLM package)


@pytest.fixture(scope="module")
def mlm(tokenizer):
    lm = wrap_model(tiny_bert(masked_lm=True, vocab_size=30522, positions=512, seed=3))
    lm.tokenizer = tokenizer
    return lm


def synthetic_corpus(tokenizer, n_docs=12, seed=0):
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3][:3000]
    rng = np.random.default_rng(seed)
    lengths = [120 if i % 4 == 0 else 560 for i in range(n_docs)]  # a quarter too short for 500 tokens
    return [Document(str(i), f"doc {i}", " ".join(rng.choice(words, n))) for i, n in enumerate(lengths)]


def notebook_loop(model, tokenizer, docs, trials):
    """Direct transcription of the paper's notebook, one sequence at a time, using its own loss."""
    diffs = []
    for t in trials:
        ids = tokenizer(docs[t.doc_index].text)["input_ids"]
        x = torch.tensor([ids[:500]])
        masked = x.clone()
        masked[0, t.pos_long] = tokenizer.mask_token_id
        loss500 = model(input_ids=masked, labels=x).loss.item()
        x = torch.tensor([ids[:50]])
        masked = x.clone()
        masked[0, t.pos_short] = tokenizer.mask_token_id
        loss50 = model(input_ids=masked, labels=x).loss.item()
        diffs.append(loss50 - loss500)
    return np.array(diffs)


def test_paper_protocol_equals_notebook_transcription(mlm, tokenizer):
    docs = synthetic_corpus(tokenizer)
    trials, short, long_ = icl_trials(mlm, docs, "paper", 6, seed=1, batch_size=4)
    assert all(len(tokenizer(docs[t.doc_index].text)["input_ids"]) >= 500 for t in trials)
    with torch.no_grad():
        expected = notebook_loop(mlm.model, tokenizer, docs, trials)
    np.testing.assert_allclose(short - long_, expected, atol=2e-5)


def test_masked_token_loss_equals_by_hand_cross_entropy(mlm, tokenizer):
    docs = synthetic_corpus(tokenizer)
    trials, short, long_ = icl_trials(mlm, docs, "masked-token", 5, seed=2)
    enc = tokenize_lengths(tokenizer, docs)
    for t, ls, ll in zip(trials, short, long_):
        assert t.pos_long == t.pos_short and 1 <= t.pos_short < 50
        for length, got in ((50, ls), (500, ll)):
            ids = torch.tensor([enc[t.doc_index][:length]])
            masked = ids.clone()
            masked[0, t.pos_short] = tokenizer.mask_token_id
            with torch.no_grad():
                logits = mlm.model(input_ids=masked).logits[0, t.pos_short]
            by_hand = -torch.log_softmax(logits.double(), -1)[ids[0, t.pos_short]].item()
            assert got == pytest.approx(by_hand, abs=1e-4)


def test_run_outputs_seeded_and_reused(mlm, tokenizer, tmp_path):
    docs = synthetic_corpus(tokenizer)
    cfg = ICLConfig(model="tiny", corpus="synthetic", trials=8, seed=4)
    meta = run_experiment(ICL, cfg, tmp_path / "a", lm=mlm, docs=docs)
    run_experiment(ICL, cfg, tmp_path / "b", lm=mlm, docs=docs)
    assert (tmp_path / "a" / "icl.csv").read_bytes() == (tmp_path / "b" / "icl.csv").read_bytes()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["n"] == 8 and summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert {"mean", "ci95", "n", "protocol", "model", "corpus", "share_improved"} <= set(summary)
    assert (tmp_path / "a" / "icl_histogram.png").stat().st_size > 5000
    header = (tmp_path / "a" / "icl.csv").read_text().splitlines()[0]
    assert header == "trial,article_id,title,pos_long,pos_short,loss_50,loss_500,difference"
    assert run_experiment(ICL, cfg, tmp_path / "a", lm=mlm, docs=docs)["reused"]  # same model and corpus content
    assert meta["summary"]["mean"] == summary["mean"]


def test_bad_input(mlm, tokenizer, tmp_path):
    short_docs = [Document("0", "x", "tiny text")] * 5
    with pytest.raises(CorpusError, match="0 of 5 qualified"):
        draw_trials(tokenize_lengths(tokenizer, short_docs), "paper", 3, 0)
    docs = synthetic_corpus(tokenizer, n_docs=4)
    with pytest.raises(CorpusError, match="only 3 of 4 articles"):
        icl_trials(mlm, docs, "masked-token", 50, 0)
    encoder = wrap_model(tiny_bert(vocab_size=30522, positions=512))
    encoder.tokenizer = tokenizer
    with pytest.raises(MissingHeadError, match="no masked-LM head"):
        icl_trials(encoder, docs, "masked-token", 3, 0)
    with pytest.raises(CorpusError, match="neither an existing"):
        load_corpus(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(CorpusError, match="no string 'text' field"):
        load_corpus(str(bad))
    with pytest.raises(CorpusError, match="cannot be reached"):  # the suite runs with HF_HUB_OFFLINE=1
        load_corpus("hf:surely/not-a-dataset-attnlab")


def test_corpus_sources(tmp_path, simplewiki_path):
    docs = load_corpus(str(simplewiki_path), limit=5)
    assert len(docs) == 5 and docs[0].title and len(docs[0].text) > 1000
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hello world")
    assert load_corpus(str(tmp_path / "txt"))[0].text == "hello world"
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"id": 7, "title": "T", "text": "some text"}) + "\n")
    assert load_corpus(str(tmp_path / "c.jsonl.gz")) == [Document("7", "T", "some text")]


@pytest.mark.parametrize("family", ["roberta", "distilbert", "modernbert"])
def test_icl_reads_any_masked_lm_through_its_family_head(family, tokenizer):
    """compute_icl on other masked-LM families (through the family record's LM head) equals the model's own
    logits by hand; a causal model is refused with the reason."""
    import transformers
    from attnlab.core.errors import InputError
    from attnlab.core.models import wrap_model
    from attnlab.icl import compute_icl

    torch.manual_seed(0)
    common = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=520)
    cfg, cls = {
        "roberta": (transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=48, pad_token_id=0, **{**common,
                                               "max_position_embeddings": 522}), transformers.RobertaForMaskedLM),
        "distilbert": (transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=48, **common),
                       transformers.DistilBertForMaskedLM),
        "modernbert": (transformers.ModernBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=48, pad_token_id=0, bos_token_id=101,
                                                     eos_token_id=102, cls_token_id=101, sep_token_id=102,
                                                     mask_token_id=103, **common), transformers.ModernBertForMaskedLM),
    }[family]
    model = cls(cfg).eval()
    lm = wrap_model(model, tokenizer=tokenizer, name=family)
    docs = synthetic_corpus(tokenizer)
    result = compute_icl(lm, docs, "masked-token", 3, seed=1)
    enc = tokenize_lengths(tokenizer, docs)
    t = result.trials[0]
    ids = torch.tensor([enc[t.doc_index][:500]])
    ids[0, t.pos_long] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, t.pos_long]
    by_hand = -torch.log_softmax(logits.double(), -1)[enc[t.doc_index][t.pos_long]].item()
    assert result.loss_long[0] == pytest.approx(by_hand, abs=1e-4)
    assert result.summary()["n"] == 3
    with pytest.raises(InputError, match="causal"):
        compute_icl(wrap_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2)), tokenizer=tokenizer), docs, n_trials=2)


def test_csv_fields_with_commas_are_quoted(inside, capsys):
    rc, _, _ = run_cli(["icl", "--model", "mlm", "--corpus", "corpus.jsonl.gz", "--out", "icl1", "--trials", "3",
                     "--device", "cpu", "--no-progress"], capsys)
    assert rc == 0
    rows = list(csv.DictReader(open(inside / "icl1" / "icl.csv")))
    assert len(rows) == 3 and all(r["article_id"].startswith("art,") and "," in r["title"] for r in rows)
    assert all(float(r["difference"]) == pytest.approx(float(r["loss_50"]) - float(r["loss_500"]), abs=1e-6)
               for r in rows)
    folder = inside / "a,b model"
    shutil.copytree(inside / "mlm", folder, dirs_exist_ok=True)
    rc, _, _ = run_cli(["induction", "--model", str(folder), "--out", "commas", "--trials", "2", "--seq-len", "10",
                     "--device", "cpu", "--no-progress"], capsys)
    rows = list(csv.DictReader(open(inside / "commas" / "scores.csv")))
    assert rc == 0 and {r["model"] for r in rows} == {str(folder)} and {r["target"] for r in rows} == {"prev", "before", "after"}


def test_single_icl_trial_writes_valid_json_with_null(inside, capsys):
    rc, out, _ = run_cli(["icl", "--model", "mlm", "--corpus", "gz_named.jsonl", "--out", "one", "--trials", "1",
                       "--device", "cpu", "--no-progress"], capsys)  # also: a gzip file named .jsonl still reads
    assert rc == 0 and "no CI: 1 trial" in out
    text = (inside / "one" / "summary.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text)
    assert summary["ci95"] == [None, None] and summary["std"] is None and "at least 2 trials" in summary["note"]
