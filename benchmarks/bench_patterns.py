"""Pattern projections: 144 heads x 100 words against the full vocabulary (bert-base-sized, random init).

Baseline in the same process: the explicit route - build each head's d_model x d_model W^P and compare
the patterns with the vocabulary unchunked, one head at a time. Target: fast path <= 5 s on this CPU.
"""

import time

import torch
from transformers import BertConfig, BertModel

from attnlab.core.models import wrap_model
from attnlab.core.weights import head_weights
from attnlab.geometry.projections import explicit_matrix, project, top_k_vocab


def main():
    torch.manual_seed(0)
    lm = wrap_model(BertModel(BertConfig()))
    w = head_weights(lm)
    vocab = lm.base.embeddings.word_embeddings.weight.detach()
    x = vocab[torch.randint(1000, 30000, (100,))][:, None].expand(-1, 12, -1)
    layers = list(range(12))
    t = time.perf_counter()
    p = project(x, w, "pattern", layers)
    vals, ids = top_k_vocab(p.reshape(-1, p.shape[-1]), vocab, 15)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    vn = torch.nn.functional.normalize(vocab, dim=-1)
    for layer in layers[:3]:  # 36 of 144 heads, extrapolated: the explicit route is slow
        for h in range(12):
            pe = x[:, layer] @ explicit_matrix(w, "pattern", layer, h)
            (torch.nn.functional.normalize(pe, dim=-1) @ vn.T).topk(15, dim=-1)
    slow = (time.perf_counter() - t) * 4
    print(f"fast path: {fast:.2f} s for 144 heads x 100 words x {vocab.shape[0]} tokens (target <= 5 s)")
    print(f"explicit d x d per head (extrapolated from 36 heads): {slow:.2f} s; ratio explicit/fast = {slow / fast:.2f}")


if __name__ == "__main__":
    main()
