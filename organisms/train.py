"""Train a model organism (``attnlab train``): a recipe, a seed and a corpus in, Hugging Face checkpoints out.

Folder layout (``out``)::

    checkpoints/step-000000/ ...   save_pretrained() model + tokenizer at log-spaced steps (step 0 = the init)
    curves.csv, curves.png         per evaluation: loss on text, loss and accuracy on repeated tokens, copying gain
    meta.json                      recipe, seed, corpus and code identity, versions, checkpoints, final numbers
    state/training.pt              weights, optimiser and step of the last evaluation: a rerun resumes from it

Seeded runs are identical: the initial weights come from the seed, every batch from (seed, step)
(:mod:`attnlab.organisms.data`), dropout is off. Ctrl-C saves the state and a checkpoint of the step reached,
and the same command resumes (to the same weights as an uninterrupted run).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from attnlab.core.errors import InputError
from attnlab.organisms import data as D
from attnlab.organisms.recipes import Recipe, checkpoint_steps

CURVES = ["step", "lr", "train_loss", "text_loss", "rrt_loss_first", "rrt_loss_second", "rrt_acc_second",
          "copying_gain", "elapsed_s"]
EVAL_N, EVAL_TRIALS = 30, 32  # the fixed repeated-random-token evaluation: [CLS] X X, |X| = 30, 32 sequences


def build_model(recipe: Recipe, vocab: int, seed: int):
    """The untrained model of a recipe, initialised from ``seed``."""
    torch.manual_seed(seed)
    if recipe.arch == "gpt_neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=recipe.d_model, num_hidden_layers=recipe.layers,
                            num_attention_heads=recipe.heads, intermediate_size=4 * recipe.d_model,
                            max_position_embeddings=512, rotary_pct=1.0, use_parallel_residual=False,
                            tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                            hidden_dropout=0.0, attention_dropout=0.0)
        model = GPTNeoXForCausalLM(cfg)
    elif recipe.arch == "bert":
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=vocab, hidden_size=recipe.d_model, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, intermediate_size=4 * recipe.d_model,
                         max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = BertForMaskedLM(cfg)
    elif recipe.arch == "modernbert":  # BERT-style masked LM with rotary positions; global layers but for local_first
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        # a local first layer (as ModernBERT's own local layers, narrower) sees only the neighbours: it cannot match
        # a token with its duplicate far away, which a global one does instead of forming a previous-token head
        layer_types = ["full_attention"] * recipe.layers
        if recipe.local_first:
            layer_types[0] = "sliding_attention"

        cfg = ModernBertConfig(vocab_size=vocab, hidden_size=recipe.d_model, num_hidden_layers=recipe.layers,
                               num_attention_heads=recipe.heads, intermediate_size=2 * recipe.d_model,
                               max_position_embeddings=512, layer_types=layer_types,
                               **({"local_attention": 2 * recipe.local_first} if recipe.local_first else {}),
                               pad_token_id=0, cls_token_id=2, bos_token_id=2, sep_token_id=3, eos_token_id=3,
                               tie_word_embeddings=True,
                               # the output head only at the predicted positions: the same loss, 37% less time a
                               # step (the 2,048-way softmax at every position was a third of it)
                               sparse_prediction=True)
        model = ModernBertForMaskedLM(cfg)
    else:
        raise InputError(f"recipe {recipe.name!r} names architecture {recipe.arch!r}; use gpt_neox, bert or "
                         "modernbert")
    if recipe.head_dropout > 0:  # the hook point that drops heads: SDPA plus the edit
        from attnlab.core.attention_impl import CAPTURE_IMPLEMENTATION, install_capture_attention

        install_capture_attention()
        model.config._attn_implementation = CAPTURE_IMPLEMENTATION
    else:
        model.config._attn_implementation = "sdpa"
    return model


class HeadDropout:
    """An editor for the one hook point (:class:`attnlab.core.attention_impl.editing`) that drops each head of the
    first layer, per sequence, with probability ``p`` and scales the kept ones by ``1 / (1 - p)`` (DropHead, Zhou et
    al. 2020). In training only: it spreads the first layer's roles over several heads, so that the induction head's
    feeder is not one necessary head. ``out``: ``[B, S, H, d_head]``; the draws come from ``g``."""

    def __init__(self, module, p: float, g: torch.Generator):
        self.module, self.p, self.g = module, p, g

    def edit(self, module, out):
        if module is not self.module:
            return out
        keep = torch.rand((out.shape[0], 1, out.shape[2], 1), generator=self.g) >= self.p
        return out * keep.to(out.dtype) / (1 - self.p)


def _first_attention(model):
    from attnlab.core.architectures import architecture_of

    return architecture_of(model.config).attention_modules(model.base_model)[0]


def _lr(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then constant: a decaying rate would slow the plateau before the phase change."""
    return recipe.lr * min(1.0, step / recipe.warmup)


def _loss(model, recipe: Recipe, ids: torch.Tensor, vocab: int, g: torch.Generator,
          role: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of a batch ``ids [B, L]`` whose positions have ``role [B, L]`` (:func:`data.batch`'s; None:
    evaluation text, every position ordinary). Causal: the mean next-token loss over the predicted positions - every
    one, except that only a ``first_copy_loss`` share (drawn from ``g``) of the tokens in spans' first copies is
    predicted. Those are random: predicting them teaches only that they are uniform, and the 2,048-way output head
    at every position was about a third of a step's time. Masked: BERT's masked-token loss."""
    if recipe.objective == "causal":
        if role is None or recipe.first_copy_loss >= 1:
            return model(input_ids=ids, labels=ids).loss
        target = role[:, 1:]  # position i predicts token i + 1
        kept = (target != D.FIRST) | (torch.rand(target.shape, generator=g) < recipe.first_copy_loss)
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1][kept]
        logits = model.get_output_embeddings()(hidden)
        return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][kept])
    copy = None if role is None else role == D.SECOND
    inputs, labels = D.mask_for_mlm(ids, recipe.mask_prob, vocab, g, copy, recipe.copy_mask)
    return model(input_ids=inputs, labels=labels).loss


@torch.no_grad()
def evaluate(model, recipe: Recipe, eval_text: torch.Tensor, rrt: torch.Tensor, vocab: int) -> dict:
    """Loss on held-out text; on [CLS] X X the loss and top-1 accuracy of the second copy's tokens and the
    copying gain (loss without the copy minus with it: what the copy buys).
    Causal: next-token predictions of X's tokens 2..n in each copy (the first copy has no copy before it).
    Masked: one token of the second copy masked per sequence (at a position cycling over X), and as the control the
    same position with the first copy replaced by another sequence's X - masking the first copy instead would
    leave the later copy readable to a bidirectional model. ``rrt_loss_first`` holds the control's loss."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    text = _loss(model, recipe, eval_text, vocab, g).item()
    n = (rrt.shape[1] - 1) // 2
    if recipe.objective == "causal":
        logp = model(input_ids=rrt).logits.float().log_softmax(-1)
        nll = -logp[:, :-1].gather(-1, rrt[:, 1:, None])[..., 0]  # nll[:, i] predicts token i + 1
        first, second = nll[:, 1:n], nll[:, n + 1:2 * n]
        hit = (logp[:, n + 1:2 * n].argmax(-1) == rrt[:, n + 2:]).float()
    else:
        rows = torch.arange(rrt.shape[0])
        offset = 1 + rows % n  # which token of X, per sequence
        losses, hits = [], []
        control = rrt.clone()
        control[:, 1:n + 1] = rrt.roll(1, dims=0)[:, 1:n + 1]  # another trial's X: no copy of the masked token
        pos = offset + n
        for ids in (control, rrt):
            masked = ids.clone()
            masked[rows, pos] = D.SPECIALS.index("[MASK]")
            logits = model(input_ids=masked).logits[rows, pos].float()
            losses.append(torch.nn.functional.cross_entropy(logits, rrt[rows, pos], reduction="none"))
            hits.append((logits.argmax(-1) == rrt[rows, pos]).float())
        first, second, hit = losses[0], losses[1], hits[1]
    model.train()
    return {"text_loss": text, "rrt_loss_first": first.mean().item(), "rrt_loss_second": second.mean().item(),
            "rrt_acc_second": hit.mean().item(), "copying_gain": (first.mean() - second.mean()).item()}


def _dropping(model, recipe: Recipe, seed: int, step: int):
    """The training step's head dropout (a no-op context for a recipe without it)."""
    from contextlib import nullcontext

    if recipe.head_dropout <= 0 or step < recipe.head_dropout_from:
        return nullcontext()
    from attnlab.core.attention_impl import editing

    return editing(HeadDropout(_first_attention(model), recipe.head_dropout, D.generator(seed, step, stream=2)))


def _save_checkpoint(model, tokenizer, folder: Path) -> None:
    """An atomic save_pretrained() of model and tokenizer (a partial folder never looks finished)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _save_state(model, optimizer, step: int, rows: list, identity: str, folder: Path) -> None:
    from attnlab.core.outputs import atomic_path

    folder.mkdir(exist_ok=True)
    with atomic_path(folder / "training.pt") as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "rows": rows,
                    "identity": identity}, tmp)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def identity(recipe: Recipe, seed: int, corpus_digest: str) -> str:
    """What decides the trained weights: the recipe, the seed, the corpus and the code training runs (this module and
    the attnlab modules it imports: an edit elsewhere in attnlab does not call for a retrain)."""
    from attnlab.core.provenance import code_fingerprint, digest

    return digest({"recipe": recipe.record(), "seed": seed, "corpus": corpus_digest,
                   "attnlab": code_fingerprint(__name__)})


def train(recipe: Recipe, out, texts: list[str], corpus_digest: str, *, seed: int = 0, say=print,
          progress: bool = False, corpus: str = "") -> dict:
    """Train ``recipe`` on ``texts`` into ``out`` (resuming a run of the same identity there; a finished one is
    returned as it is). Returns meta.json's content."""
    from attnlab.core.outputs import check_out_dir, folder_lock, read_json, versions, write_json

    out = Path(out)
    check_out_dir(out)
    key = identity(recipe, seed, corpus_digest)
    with folder_lock(out):
        meta = read_json(out / "meta.json")
        if meta and meta.get("identity") == key and meta.get("finished"):
            return {**meta, "reused": True}
        if meta and meta.get("identity") != key:
            raise InputError(f"{out} holds a model trained with another recipe, seed, corpus or attnlab; choose "
                             "another output folder")
        meta = _train(recipe, out, texts, key, seed, say, progress, versions, write_json, corpus)
    return meta


def _train(recipe, out: Path, texts, key, seed, say, progress, versions, write_json, corpus) -> dict:
    from attnlab.core.outputs import csv_cell, write_csv

    t0 = time.perf_counter()
    tokenizer = D.train_tokenizer(texts, recipe.vocab_size, out / "tokenizer", recipe.objective == "causal")
    vocab = len(tokenizer)
    stream = D.token_stream(tokenizer, texts)
    split = int(0.9 * len(stream))  # held-out text for evaluation: the last tenth
    train_text, held_out = stream[:split], stream[split:]
    eval_text = torch.stack([held_out[i:i + recipe.seq_len] for i in
                             range(0, min(len(held_out) - recipe.seq_len, 8 * recipe.seq_len), recipe.seq_len)])
    eval_text[:, 0] = 2
    rrt = D.rrt_eval(vocab, min(EVAL_N, (vocab - D.ORDINARY) // 2), EVAL_TRIALS, seed, sep=recipe.sep_end)
    model = build_model(recipe, vocab, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    start, rows = 0, []
    state_path = out / "state" / "training.pt"
    if state_path.is_file():  # resume: the state of the last evaluation (or of the interrupt)
        state = torch.load(state_path, weights_only=True)
        if state.get("identity") != key:  # never mix checkpoints of two runs in one folder
            raise InputError(f"{out} holds an unfinished run of another recipe, seed, corpus or attnlab; choose "
                             "another output folder")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, rows = int(state["step"]), [list(r) for r in state["rows"]]
        t0 -= rows[-1][-1] if rows else 0.0  # elapsed time keeps counting from the earlier run's
        say(f"train: resuming {recipe.name} at step {start} of {recipe.steps}")
    saves = set(checkpoint_steps(recipe)) | {0}
    ckpt = out / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    if start == 0:
        _save_checkpoint(model, tokenizer, ckpt / checkpoint_name(0))
        rows.append(_row(0, 0.0, float("nan"), evaluate(model, recipe, eval_text, rrt, vocab), t0))
    model.train()
    completed = start
    last_line = time.monotonic()
    try:
        for step in range(start + 1, recipe.steps + 1):
            lr = _lr(recipe, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids, role = D.batch(recipe, train_text, vocab, seed, step)
            with _dropping(model, recipe, seed, step):
                loss = _loss(model, recipe, ids, vocab, D.generator(seed, step, stream=1), role)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            completed = step
            if step % recipe.eval_every == 0 or step == recipe.steps:
                rows.append(_row(step, lr, loss.item(), evaluate(model, recipe, eval_text, rrt, vocab), t0))
                _save_state(model, optimizer, step, rows, key, out / "state")
                if progress and time.monotonic() - last_line > 10:
                    last_line = time.monotonic()
                    r = rows[-1]
                    say(f"train {recipe.name}: step {step}/{recipe.steps}, text loss {r[3]:.3f}, repeated-token "
                        f"loss {r[5]:.3f}, copying gain {r[7]:.3f} ({r[8]:.0f} s)")
            if step in saves:
                _save_checkpoint(model, tokenizer, ckpt / checkpoint_name(step))
    except KeyboardInterrupt:
        rows = [r for r in rows if r[0] <= completed]
        _save_state(model, optimizer, completed, rows, key, out / "state")  # a rerun resumes after this step
        _save_checkpoint(model, tokenizer, ckpt / checkpoint_name(completed))
        raise
    write_csv(out / "curves.csv", CURVES, [[csv_cell(v) for v in r] for r in rows])
    from attnlab.figures.organisms import plot_curves

    plot_curves(rows, CURVES, f"{recipe.name} (seed {seed}): a small model trained here", out / "curves.png",
                recipe.dropout_from)
    final = dict(zip(CURVES, rows[-1]))
    meta = {"experiment": "train", "recipe": recipe.record(), "seed": seed, "corpus": corpus, "identity": key,
            "finished": True,
            "checkpoints": sorted(p.name for p in ckpt.iterdir() if p.is_dir() and not p.name.endswith(".partial")),
            "final": checkpoint_name(recipe.steps), "final_metrics": final, "versions": versions(),
            "train_s": round(time.perf_counter() - t0, 1),  # resumed runs: the interrupted runs' time included
            "label": "a small model trained here by attnlab (not a published checkpoint)"}
    write_json(out / "meta.json", meta)
    shutil.rmtree(out / "state", ignore_errors=True)
    return meta


def _row(step, lr, train_loss, metrics: dict, t0) -> list:
    return [step, lr, train_loss, metrics["text_loss"], metrics["rrt_loss_first"], metrics["rrt_loss_second"],
            metrics["rrt_acc_second"], metrics["copying_gain"], time.perf_counter() - t0]
