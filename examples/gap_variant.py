"""A user-defined RRT variant: X, then k filler tokens, then X again (the README's worked example).

    attnlab --plugin examples/gap_variant.py induction --variant gap --model bert-base-uncased --out runs/gap
"""

import torch

from attnlab.induction import RRTBatch, register_variant

GAP = 10  # filler tokens between the copies


@register_variant("gap", ["prev", "before", "after"], f"X, {GAP} random filler tokens, X; mask in the second copy.")
def build_gap(protocol, n_trials, n, g):
    tokens = protocol.draw(n_trials, n + GAP, g)  # distinct under 'clean': fillers never repeat X
    x, filler = tokens[:, :n], tokens[:, n:]
    ids, off = protocol.frame(torch.cat([x, filler, x], dim=1))
    j = torch.randint(1, n - 1, (n_trials,), generator=g)  # never a copy's edge
    prev = off + j
    return RRTBatch.masked(ids, off + n + GAP + j, protocol.mask_id,
                           {"prev": prev, "before": prev - 1, "after": prev + 1})
