"""Model organisms: training is seeded and resumes to the same weights, checkpoints load in transformers and in
attnlab, and the dynamics table equals what the individual commands give for the same checkpoints."""

import csv
import json

import pytest
import torch
from attnlab.experiments.cli import main
from conftest import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("org") / "corpus.jsonl.gz", articles=12, sentences=60)


def _train(out, corpus, recipe="smoke"):
    assert main(["train", "--recipe", recipe, "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 0


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("org") / "a"
    _train(out, corpus)
    return out


def test_training_is_seeded_and_an_interrupted_run_resumes_to_the_same_weights(trained, corpus, tmp_path,
                                                                              monkeypatch, capsys):
    from attnlab.organisms import data

    real = data.batch

    def interrupted(recipe, text, vocab, seed, step):  # Ctrl-C arrives while step 23's batch is built
        if step == 23:
            raise KeyboardInterrupt
        return real(recipe, text, vocab, seed, step)

    out = tmp_path / "b"
    monkeypatch.setattr(data, "batch", interrupted)
    assert main(["train", "--recipe", "smoke", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 130
    assert (out / "checkpoints" / "step-000022").is_dir() and not (out / "meta.json").exists()  # the last step kept
    monkeypatch.setattr(data, "batch", real)
    capsys.readouterr()
    _train(out, corpus)  # the same command resumes
    assert "resuming smoke at step 22" in capsys.readouterr().out
    for step in ("step-000000", "step-000025", "step-000040"):
        a, b = _weights(trained / "checkpoints" / step), _weights(out / "checkpoints" / step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    rows = [list(csv.reader(open(p / "curves.csv"))) for p in (trained, out)]
    assert [r[:-1] for r in rows[0]] == [r[:-1] for r in rows[1]]  # every evaluation equal but the elapsed time
    # a finished run is reused, not retrained
    capsys.readouterr()
    _train(out, corpus)
    assert "already trained: reused" in capsys.readouterr().out


def test_checkpoints_load_in_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = trained / "checkpoints" / "step-000040"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "gpt_neox" and tokenizer.bos_token == "[CLS]"
    assert len(tokenizer) == model.config.vocab_size


def test_dynamics_equals_the_individual_commands(trained, tmp_path):
    """The dynamics row of a checkpoint is what `attnlab induction` and `attnlab ablate` (which load it like any
    model) give for it."""
    out = tmp_path / "d"
    assert main(["dynamics", "--checkpoints", str(trained), "--out", str(out), "--trials", "4", "--seq-len", "8",
                 "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "dynamics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 10, 16, 25, 40] and (out / "dynamics.png").stat().st_size > 5000
    last = rows[-1]
    final = trained / "checkpoints" / "step-000040"
    assert main(["induction", "--model", str(final), "--seq-len", "8", "--trials", "4", "--out", str(tmp_path / "i"),
                 "--device", "cpu", "--no-progress"]) == 0
    after = [r for r in csv.DictReader(open(tmp_path / "i" / "scores.csv")) if r["target"] == "after"]
    best = max(after, key=lambda r: float(r["lift"]))
    assert last["induction_head"] == f"L{best['layer']}H{best['head']}"
    assert float(last["induction_score"]) == pytest.approx(float(best["lift"]), rel=1e-4, abs=1e-7)
    assert main(["ablate", "--model", str(final), "--heads", "L0H0", "--trials", "4", "--seq-len", "8",
                 "--out", str(tmp_path / "x"), "--device", "cpu", "--no-progress"]) == 0
    gain = next(r for r in csv.DictReader(open(tmp_path / "x" / "ablation.csv")) if r["metric"] == "copying_gain")
    assert float(last["copying_gain"]) == pytest.approx(float(gain["baseline"]), rel=1e-4, abs=1e-6)


def test_a_masked_organism_trains_loads_and_is_measured_as_it_was_trained(corpus, tmp_path, capsys):
    """A masked organism trained without an end marker is measured on [CLS] X X (end_sep off) by `dynamics`, and
    its rows equal what `induction --no-end-sep` and `ablate --no-end-sep` give; with the [SEP] they differ."""
    from transformers import AutoModelForMaskedLM

    _train(tmp_path / "m", corpus, recipe="smoke-mlm")
    assert "measure it as trained with --no-end-sep" in capsys.readouterr().out
    final = tmp_path / "m" / "checkpoints" / "step-000040"
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.model_type == "bert"
    out = tmp_path / "d"
    common = ["--seq-len", "8", "--trials", "4", "--no-progress"]
    assert main(["dynamics", "--checkpoints", str(tmp_path / "m"), "--out", str(out), *common]) == 0
    assert json.loads((out / "meta.json").read_text())["end_sep"] is False
    last = list(csv.DictReader(open(out / "dynamics.csv")))[-1]
    lifts, gains = {}, {}
    for flags in ([], ["--no-end-sep"]):
        key = bool(flags)
        assert main(["induction", "--model", str(final), "--out", str(tmp_path / f"i{key}"), "--device", "cpu",
                     *common, *flags]) == 0
        prev = [r for r in csv.DictReader(open(tmp_path / f"i{key}" / "scores.csv")) if r["target"] == "prev"]
        lifts[key] = max(float(r["lift"]) for r in prev)
        assert main(["ablate", "--model", str(final), "--heads", "L0H0", "--out", str(tmp_path / f"x{key}"),
                     "--device", "cpu", *common, *flags]) == 0
        gains[key] = next(float(r["baseline"]) for r in csv.DictReader(open(tmp_path / f"x{key}" / "ablation.csv"))
                          if r["metric"] == "copying_gain")
    assert float(last["induction_score"]) == pytest.approx(lifts[True], rel=1e-4, abs=1e-7)
    assert float(last["copying_gain"]) == pytest.approx(gains[True], rel=1e-4, abs=1e-6)
    assert gains[False] != pytest.approx(gains[True], rel=1e-3)  # the [SEP] changes what is measured


def test_the_masked_recipe_predicts_only_masked_positions_with_the_same_loss():
    """The masked recipe's model runs its output head only where a token is predicted (37% less time a step); the
    loss must be the one the head at every position gives."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import _loss, build_model

    recipe = replace(get_recipe("induction-mlm"), d_model=32, heads=2, layers=1, seq_len=24, batch=3)
    model = build_model(recipe, 256, seed=0)
    assert model.sparse_prediction
    ids = torch.randint(D.ORDINARY, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    sparse = _loss(model, recipe, ids, 256, torch.Generator().manual_seed(2))
    model.sparse_prediction = False
    dense = _loss(model, recipe, ids, 256, torch.Generator().manual_seed(2))
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-6) and sparse.item() > 1.0



def test_bert_framing_ends_every_sequence_in_sep_at_varied_lengths_and_never_masks_it():
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe

    recipe = replace(get_recipe("induction-mlm"), batch=4, sep_end=True, min_len=64)  # the framing the recipe had
    text = torch.arange(D.ORDINARY, 600).repeat(4)
    sep = D.SPECIALS.index("[SEP]")
    lengths = set()
    for step in range(1, 30):
        ids, _ = D.batch(recipe, text, 2048, 0, step)
        lengths.add(ids.shape[1])
        assert recipe.min_len <= ids.shape[1] <= recipe.seq_len
        assert (ids[:, 0] == 2).all() and (ids[:, -1] == sep).all() and int((ids == sep).sum()) == len(ids)
        inputs, labels = D.mask_for_mlm(ids, 0.9, 2048, D.generator(0, step, stream=1))
        assert (labels[:, -1] == -100).all() and (inputs[:, -1] == sep).all()
    assert len(lengths) > 10  # [SEP] is seen at many positions
    assert D.batch(recipe, text, 2048, 0, 1, length=recipe.seq_len)[0].shape[1] == recipe.seq_len
    assert D.rrt_eval(2048, 5, 3, 0, sep=True)[:, -1].eq(sep).all()


def test_a_fragment_copy_is_a_contiguous_piece_of_the_span_before_it():
    """With ``p_fragment`` a second copy may be only a piece of X: every copy is a contiguous run of earlier tokens,
    and some are shorter than the span they copy (so "the token of X whose copy is missing" names no answer)."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe

    recipe = replace(get_recipe("induction-mlm"), p_text=0.0, gap_max=0, p_fragment=0.5, sep_end=False, min_len=0)
    text = torch.arange(D.ORDINARY, 600).repeat(4)
    whole = pieces = 0
    for step in range(1, 6):
        ids, role = D.batch(recipe, text, 2048, 0, step)
        for row, marks in zip(ids.tolist(), (role == D.SECOND).tolist()):
            p = 1
            while p < len(row):
                if not marks[p]:
                    p += 1
                    continue
                end = p
                while end < len(row) and marks[end]:
                    end += 1
                run, m = row[p:end], end - p
                if end < len(row):  # a run cut by the sequence's end may be either
                    assert any(row[s:s + m] == run for s in range(p - m + 1)), "a copy of nothing before it"
                    whole += row[p - m:p] == run
                    pieces += row[p - m:p] != run
                p = end
    assert whole > 10 and pieces > 10

def test_copies_masked_apart_keep_each_predicted_copy_token_between_visible_neighbours():
    """``copy_mask``: in second copies only every other token is predicted (so induction's neighbour is always in
    view and one gap per copy cannot name the answer), elsewhere BERT's rate; without it the masks are BERT's."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe

    recipe = replace(get_recipe("induction-mlm"), batch=8)
    text = torch.arange(D.ORDINARY, 600).repeat(4)
    ids, role = D.batch(recipe, text, 2048, 0, 3)
    copy = role == D.SECOND
    plain = D.mask_for_mlm(ids, 0.15, 2048, D.generator(0, 3, stream=1))
    assert torch.equal(plain[1], D.mask_for_mlm(ids, 0.15, 2048, D.generator(0, 3, stream=1), copy, 0.0)[1])
    inputs, labels = D.mask_for_mlm(ids, 0.15, 2048, D.generator(0, 3, stream=1), copy, 0.8)
    predicted = labels != -100
    in_copy = predicted & copy
    assert not (in_copy[:, 1:] & in_copy[:, :-1]).any()  # never two neighbours in a copy
    share = in_copy.sum() / copy.sum()
    assert 0.3 < share < 0.5  # half the copy's tokens, each with probability 0.8
    outside = predicted & ~copy
    assert 0.08 < outside.sum() / (~copy).sum() < 0.22
    plain_share = (plain[1] != -100)[copy].float().mean()
    assert torch.equal(inputs[~predicted], ids[~predicted]) and plain_share < 0.25


def test_an_unknown_recipe_is_one_line(capsys, corpus, tmp_path):
    assert main(["train", "--recipe", "nope", "--corpus", str(corpus), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown recipe 'nope'; known: induction-causal" in err


def test_the_main_job_shows_a_cached_organism_and_names_the_command_without_one(trained, corpus, tmp_path,
                                                                             monkeypatch):
    from attnlab.experiments import organisms
    from attnlab.experiments.reproduce import Runner, Settings

    settings = Settings(out=tmp_path / "report", corpus=str(corpus), quick=True, progress=False)
    (tmp_path / "report").mkdir()
    runner = Runner(settings, say=lambda *_: None)
    missing = organisms.organism_sections(runner, tmp_path / "none")
    assert len(missing) == 1 and "attnlab train --recipe induction-causal" in missing[0]["error"]
    assert organisms.organism_line(missing) == f"organism sections not produced: {missing[0]['error']}"
    dynamics_only = [{"title": "Map", "job": "organism", "error": "broken"}, {"title": "Dynamics", "job": "organism"}]
    assert organisms.organism_line(dynamics_only) == "organism section 'Map' not produced: broken"
    assert organisms.organism_line([{"title": "Other", "job": "firstlayer"}]) is None
    monkeypatch.setattr(organisms, "ORGANISM_RECIPE", "smoke")  # the test's organism: the seconds-long recipe
    shown = organisms.organism_sections(runner, trained)
    assert [s.get("error") for s in shown] == [None, None]
    assert all((settings.out / s["image"]).is_file() for s in shown)
    assert "a small model, not a published checkpoint" in shown[0]["text"] and "after: " in shown[0]["text"]
    assert len(shown[0]["rows"]) == 4 and shown[1]["image"].endswith("dynamics.png")
    line = organisms.organism_line(shown)  # the console's line: the verdict the section's text gives
    assert line.startswith("smoke (a small model trained here) verdict: after: ") and line.split("verdict: ")[1] in \
        shown[0]["text"]
    assert "runs/organism_heads" in shown[0]["text"] and (settings.out / "runs" / "organism_heads" / "meta.json").is_file()
    # the dynamics table is reused only under the code that measured it
    import json

    from attnlab.organisms.dynamics import code_identity

    meta_path = settings.out / "runs" / "organism_dynamics" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["code"] == code_identity()
    meta["code"], meta["rows"][-1]["copying_gain"] = "older attnlab", 123.0
    meta_path.write_text(json.dumps(meta))
    again = organisms.organism_sections(runner, trained)
    assert "123" not in again[1]["text"] and json.loads(meta_path.read_text())["code"] == code_identity()


def test_an_organism_section_that_cannot_be_made_is_listed_and_the_rest_goes_on(trained, corpus, tmp_path,
                                                                                 monkeypatch):
    """The corpus a run was trained on is recorded as an absolute path (dynamics reads it back from any working
    folder); where it cannot be read, `dynamics` says so in one line and the main job lists that section as not
    made while the organism's map is still shown (it used to end a finished main job with an error)."""
    import json
    import shutil

    from attnlab.core.errors import InputError
    from attnlab.experiments import organisms
    from attnlab.experiments.reproduce import Runner, Settings
    from attnlab.organisms.dynamics import measure
    from attnlab.organisms.recipes import DynamicsConfig

    monkeypatch.chdir(corpus.parent)
    assert organisms._texts(corpus.name)[2] == str(corpus.resolve())
    moved = tmp_path / "organism"
    shutil.copytree(trained, moved)
    meta = json.loads((moved / "meta.json").read_text())
    (moved / "meta.json").write_text(json.dumps({**meta, "corpus": str(tmp_path / "gone.jsonl.gz")}))
    with pytest.raises(InputError, match="cannot be read here") as err:
        measure(moved, tmp_path / "d", DynamicsConfig(trials=2, seq_len=5))
    assert "\n" not in str(err.value)
    settings = Settings(out=tmp_path / "report", corpus=str(corpus), quick=True, progress=False)
    (tmp_path / "report").mkdir()
    monkeypatch.setattr(organisms, "ORGANISM_RECIPE", "smoke")
    shown = organisms.organism_sections(Runner(settings, say=lambda *_: None), moved)
    assert shown[0].get("error") is None and "cannot be read here" in shown[1]["error"]


def test_training_is_keyed_on_the_code_it_runs_not_on_all_of_attnlab():
    """The organism's identity digests the training module and what it imports, derived from the import
    statements: editing ablation or figure code does not call for a nine-minute retrain; editing the data does."""
    from attnlab.core.provenance import module_closure, package_root

    root = package_root()
    files = {str(p.relative_to(root)) for p in module_closure("attnlab.organisms.train")}
    assert {"organisms/train.py", "organisms/data.py", "organisms/recipes.py", "core/errors.py",
            "organisms/__init__.py", "__init__.py"} <= files
    assert not any(f.startswith(("circuits/", "figures/", "experiments/", "induction/")) for f in files)
    measured = {str(p.relative_to(root)) for p in module_closure("attnlab.organisms.dynamics")}
    assert {"circuits/tasks.py", "core/extractor.py", "organisms/data.py"} <= measured  # through function imports


def test_the_vocabulary_has_the_same_ids_in_every_process(corpus, tmp_path):
    """The `tokenizers` trainer breaks ties in a per-process hash order (two processes trained different
    vocabularies from one corpus); attnlab chooses the vocabulary by counting, so two processes (as a resumed run
    is) get the same ids."""
    import json
    import subprocess
    import sys

    code = ("import gzip, json, sys; from pathlib import Path; from attnlab.organisms.data import train_tokenizer; "
            "t = [json.loads(l)['text'] for l in gzip.open(sys.argv[1], 'rt')]; "
            "train_tokenizer(t, 300, Path(sys.argv[2]), True)")
    vocabs = []
    for i in range(2):
        subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / f"t{i}")], check=True)
        vocabs.append(json.loads((tmp_path / f"t{i}" / "tokenizer.json").read_text())["model"]["vocab"])
    assert vocabs[0] == vocabs[1] and len(vocabs[0]) > 30


def test_an_unfinished_run_of_another_identity_is_never_resumed(corpus, tmp_path, capsys):
    """A folder holding the state of another recipe, seed, corpus or attnlab is refused: checkpoints of two runs
    never mix."""
    out = tmp_path / "o"
    (out / "state").mkdir(parents=True)
    torch.save({"identity": "another run", "step": 3, "rows": [], "model": {}, "optimizer": {}},
               out / "state" / "training.pt")
    assert main(["train", "--recipe", "smoke", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 2
    assert "holds an unfinished run of another recipe" in capsys.readouterr().err


def test_the_organism_section_reads_the_k_composition_into_its_induction_head(tmp_path):
    """Not the strongest K-composition anywhere in the model: the strongest into the head the verdict named."""
    from attnlab.core.outputs import write_csv
    from attnlab.experiments.organisms import _strongest_k_composition

    header = ["layer1", "head1", "layer2", "head2", "kind", "score", "baseline", "baseline_se", "corrected"]
    write_csv(tmp_path / "c.csv", header, [[0, 0, 1, 2, "K", 0.5, 0.1, 0.001, 0.4],  # the largest, into L1H2
                                           [0, 1, 1, 0, "K", 0.2, 0.1, 0.001, 0.1],
                                           [0, 3, 1, 0, "K", 0.25, 0.1, 0.001, 0.15],
                                           [0, 2, 1, 0, "Q", 0.9, 0.1, 0.001, 0.8]])  # Q: not K
    assert _strongest_k_composition(tmp_path / "c.csv", "L1H0") == ("L0H3", 0.15)
    assert _strongest_k_composition(tmp_path / "c.csv", "L1H3") is None
    from attnlab.experiments.organisms import _k_composition_text

    assert "ranks L0H3 first (0.15 over its random baseline)" in _k_composition_text("L1H0", ("L0H3", 0.15))
    below = _k_composition_text("L1H0", ("L0H2", -0.000876))  # the shipped organism: all four below the baseline
    assert "puts no earlier head above its random baseline (the highest, L0H2, is -0.000876" in below
    assert "ranks" not in below


def test_each_first_copy_is_marked_and_followed_by_its_second_copy():
    """:func:`data.batch`'s roles: a span's first copy (random tokens) is FIRST, its copy after a gap of at most
    ``gap_max`` text tokens is SECOND with the same tokens, and text is neither."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe

    recipe = replace(get_recipe("induction-causal"), batch=8)
    text = torch.arange(D.ORDINARY, 600).repeat(4)  # text ids < 600; random spans draw from the whole vocabulary
    checked = 0
    for step in range(1, 4):
        ids, role = D.batch(recipe, text, 2048, 0, step)
        assert role.dtype == torch.int8 and set(role.unique().tolist()) == {D.OTHER, D.SECOND, D.FIRST}
        for row, marks in zip(ids.tolist(), role.tolist()):
            p = 0
            while p < len(row):
                if marks[p] != D.FIRST:
                    p += 1
                    continue
                end = p
                while end < len(row) and marks[end] == D.FIRST:
                    end += 1
                gap = end
                while gap < len(row) and marks[gap] == D.OTHER:
                    gap += 1
                copy_end = gap + (end - p)
                if copy_end <= len(row):  # not cut by the sequence's end
                    assert gap - end <= recipe.gap_max
                    assert row[gap:copy_end] == row[p:end] and set(marks[gap:copy_end]) == {D.SECOND}
                    checked += 1
                p = end
    assert checked > 30


def test_pooled_spans_repeat_their_tokens_and_text_until_gives_text_only():
    """``p_pooled`` 1: every span draws its n tokens from n // 2 of them, so each first copy repeats tokens and
    its second copy is still the same tokens; ``text_until``: batches before that step are text only (every role
    OTHER), those from it on the recipe's mix."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe

    text = torch.arange(D.ORDINARY, 600).repeat(4)
    pooled = replace(get_recipe("induction-mlm"), batch=8, p_pooled=1.0, text_until=5)
    spans = 0
    for step in (5, 6):
        ids, role = D.batch(pooled, text, 2048, 0, step)
        for row, marks in zip(ids.tolist(), role.tolist()):
            starts = [p for p in range(len(row)) if marks[p] == D.FIRST and (p == 0 or marks[p - 1] != D.FIRST)]
            for p in starts:
                end = p
                while end < len(row) and marks[end] == D.FIRST:
                    end += 1
                n = end - p
                if end < len(row) and n >= 8:  # a whole span (not cut by the end)
                    assert len(set(row[p:end])) <= n // 2
                    spans += 1
    assert spans > 10
    for step in (1, 4):
        assert (D.batch(pooled, text, 2048, 0, step)[1] == D.OTHER).all()
    plain = replace(pooled, p_pooled=0.0)
    ids, role = D.batch(plain, text, 2048, 0, 5)
    firsts = [row[p:p + 8] for row, marks in zip(ids.tolist(), role.tolist()) for p in range(len(row) - 8)
              if all(m == D.FIRST for m in marks[p:p + 8])]
    assert firsts and max(len(f) - len(set(f)) for f in firsts) <= 1  # distinct tokens (from 2,043) without it


def test_a_local_first_layer_sees_only_its_neighbours_and_survives_a_reload(tmp_path):
    """``local_first`` 2: layer 0 of the masked model puts no attention beyond two tokens away (so it cannot match a
    token with a far duplicate), layer 1 still sees the whole sequence, and the saved checkpoint reloads with the
    same layers and the same outputs."""
    from dataclasses import replace

    from transformers import AutoModelForMaskedLM

    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import build_model

    recipe = replace(get_recipe("smoke-mlm"), arch="modernbert", local_first=2)
    model = build_model(recipe, 256, 0).eval()
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(5, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    with torch.no_grad():
        first, second = reloaded(input_ids=ids, output_attentions=True).attentions
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    far = (torch.arange(24)[:, None] - torch.arange(24)[None, :]).abs() > 2
    assert first[..., far].abs().max() == 0 and first[..., ~far].min() > 0
    assert second[..., far].min() > 0  # global: every key gets some attention
    assert reloaded.config.layer_types == ["sliding_attention", "full_attention"]


def test_the_causal_loss_with_a_share_of_first_copies_is_the_loss_without_the_others():
    """``first_copy_loss`` < 1: the loss equals transformers' own loss with the dropped first-copy targets labelled
    -100 (ignored), the kept share is about ``first_copy_loss``, and at 1 it is transformers' loss unchanged."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import _loss, build_model

    smoke = get_recipe("smoke")
    text = torch.arange(D.ORDINARY, 250).repeat(8)
    model = build_model(smoke, 256, 0)
    ids, role = D.batch(replace(smoke, batch=16), text, 256, 0, 1)
    full = replace(smoke, first_copy_loss=1.0)
    assert torch.equal(_loss(model, full, ids, 256, D.generator(0, 1, 1), role),
                       model(input_ids=ids, labels=ids).loss)
    part = replace(smoke, first_copy_loss=0.25)
    target = role[:, 1:]
    kept = (target != D.FIRST) | (torch.rand(target.shape, generator=D.generator(0, 1, 1)) < 0.25)
    labels = ids.clone()
    labels[:, 1:][~kept] = -100
    reference = model(input_ids=ids, labels=labels).loss
    ours = _loss(model, part, ids, 256, D.generator(0, 1, 1), role)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, model(input_ids=ids, labels=ids).loss, rtol=1e-4)
    first = target == D.FIRST
    assert 0.15 < kept[first].float().mean() < 0.35 and kept[~first].all()


@pytest.mark.parametrize("override", [{"first_copy_loss": 0.25}, {"head_dropout": 0.5}])
def test_a_recipes_random_draws_are_seeded_and_an_interrupted_run_resumes_to_the_same_weights(corpus, tmp_path,
                                                                                              monkeypatch, trained,
                                                                                              override):
    """The loss's draw of first copies and the heads dropped come from (seed, step) alone: two runs give the same
    weights, a run interrupted at step 23 resumes to them, and they differ from the plain recipe's (the draw is in
    effect)."""
    from dataclasses import replace

    from attnlab.experiments.organisms import _texts
    from attnlab.organisms import data
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import train

    recipe = replace(get_recipe("smoke"), **override)
    texts, digest, spec = _texts(str(corpus))
    train(recipe, tmp_path / "a", texts, digest, seed=0, say=lambda *_: None, corpus=spec)
    real = data.batch

    def interrupted(recipe, text, vocab, seed, step):
        if step == 23:
            raise KeyboardInterrupt
        return real(recipe, text, vocab, seed, step)

    monkeypatch.setattr(data, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "b", texts, digest, seed=0, say=lambda *_: None, corpus=spec)
    monkeypatch.setattr(data, "batch", real)
    train(recipe, tmp_path / "b", texts, digest, seed=0, say=lambda *_: None, corpus=spec)
    a, b = (_weights(tmp_path / run / "checkpoints" / "step-000040") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plain = _weights(trained / "checkpoints" / "step-000040")
    assert not all(torch.equal(a[k], plain[k]) for k in a)


def test_head_dropout_from_a_step_leaves_the_training_before_it_as_the_plain_recipes(corpus, tmp_path, trained,
                                                                                    monkeypatch):
    """Up to ``head_dropout_from`` the run is the plain recipe's, bit for bit (the hook point that drops heads is
    SDPA itself until an edit is active); after it, the weights differ. The curves mark where it starts."""
    from dataclasses import replace

    import attnlab.figures.organisms as figures
    from attnlab.experiments.organisms import _texts
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import train

    marked = []
    real = figures.plot_curves
    monkeypatch.setattr(figures, "plot_curves", lambda *a, **k: marked.append(a[4:]) or real(*a, **k))
    texts, digest, spec = _texts(str(corpus))
    recipe = replace(get_recipe("smoke"), head_dropout=0.5, head_dropout_from=30)
    assert get_recipe("smoke").dropout_from is None and get_recipe("induction-causal").dropout_from == 1200
    train(recipe, tmp_path / "a", texts, digest, seed=0, say=lambda *_: None, corpus=spec)
    assert marked == [(30,)]
    for step, same in (("step-000025", True), ("step-000040", False)):
        a, plain = _weights(tmp_path / "a" / "checkpoints" / step), _weights(trained / "checkpoints" / step)
        assert all(torch.equal(a[k], plain[k]) for k in a) == same, step


def test_head_dropout_drops_first_layer_heads_per_sequence_and_scales_the_kept_ones():
    """A training forward pass with ``head_dropout`` equals, sequence by sequence, the plain model whose first-layer
    output projection has the dropped heads' columns zeroed and the kept ones scaled by 1 / (1 - p); later layers
    are untouched, and the draw is the step's."""
    from dataclasses import replace

    from attnlab.organisms import data as D
    from attnlab.organisms.recipes import get_recipe
    from attnlab.organisms.train import _dropping, build_model

    recipe = replace(get_recipe("smoke"), heads=4, head_dropout=0.5)
    model = build_model(recipe, 256, 0).eval()
    plain = build_model(replace(recipe, head_dropout=0.0), 256, 0).eval()
    ids, _ = D.batch(replace(recipe, batch=8), torch.arange(D.ORDINARY, 250).repeat(8), 256, 0, 3)
    with torch.no_grad(), _dropping(model, recipe, 0, 3):
        ours = model(input_ids=ids).logits
    keep = torch.rand((8, 1, 4, 1), generator=D.generator(0, 3, stream=2)) >= 0.5
    assert 0 < keep.sum() < keep.numel()  # some heads dropped, some kept
    dense = plain.gpt_neox.layers[0].attention.dense
    weight = dense.weight.detach().clone()
    d_head = weight.shape[1] // 4
    for b in range(8):
        scale = (keep[b, 0, :, 0].float() / 0.5).repeat_interleave(d_head)
        with torch.no_grad():
            dense.weight.copy_(weight * scale)
            reference = plain(input_ids=ids[b:b + 1]).logits
        assert torch.allclose(ours[b:b + 1], reference, atol=1e-5), b
    with torch.no_grad():
        dense.weight.copy_(weight)
        assert torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6)  # outside: none
