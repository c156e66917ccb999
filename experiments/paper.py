"""The paper's facts, in one place: its models (roles), the heads and numbers it reports, its figure images.

``reproduce`` and its report both read this module; nothing else states what the paper found.
"""

from __future__ import annotations

#: model roles of ``reproduce`` and the paper's checkpoint for each (``--model ROLE=ID_OR_PATH`` substitutes)
ROLES = {
    "gpt2": "gpt2",
    "bert": "bert-base-uncased",
    "bert-tiny": "prajjwal1/bert-tiny",
    "bert-small": "prajjwal1/bert-small",
    "bert-medium": "prajjwal1/bert-medium",
    "bert-large": "bert-large-uncased",
}
FIGURE9_MODELS = [ROLES[r] for r in ("bert-tiny", "bert-small", "bert-medium", "bert-large")]

#: the strongest heads the paper reports for bert-base-uncased (layer and head 0-based), by target
REPORTED_HEADS = {"prev": ["L9H0", "L9H6", "L10H1", "L10H9", "L11H8"], "before": ["L9H9"], "after": ["L8H2"]}
#: Figure 5: the mean ICL score the paper reports (its notebook gives 0.256)
REPORTED_ICL_MEAN = 0.23
#: Figures 3-4: GPT-2's heads and the notebook's optimal constants (queries / c there; attnlab: queries x c)
UMAP_HEADS = {"figure3": ((1, 2), 2.5), "figure4": ((3, 3), 0.2)}
