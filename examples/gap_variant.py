"""A user-defined RRT variant: X, then k filler tokens, then X again (the worked example of docs/induction.md).

    attnlab --plugin examples/gap_variant.py induction --variant gap --model bert-base-uncased --out runs/gap
"""

import torch

from attnlab.induction import RRTBatch, register_variant, replace_spans

GAP = 10  # filler tokens between the copies


def gap_null(protocol, batch, n, g):
    """Control sequences: the first copy replaced by fresh tokens (the fillers and the query's copy stay)."""
    return replace_spans(protocol, batch, [(protocol.offset, protocol.offset + n)], g)


@register_variant("gap", ["prev", "before", "after"], f"X, {GAP} random filler tokens, X; mask in the second copy.",
                  null=gap_null)
def build_gap(protocol, n_trials, n, g):
    tokens = protocol.draw(n_trials, n + GAP, g)  # distinct under 'clean': fillers never repeat X
    x, filler = tokens[:, :n], tokens[:, n:]
    ids, off = protocol.frame(torch.cat([x, filler, x], dim=1))
    j = torch.randint(1, n - 1, (n_trials,), generator=g)  # never a copy's edge
    prev = off + j
    return RRTBatch.masked(ids, off + n + GAP + j, protocol.mask_id,
                           {"prev": prev, "before": prev - 1, "after": prev + 1})
