"""Induction maps on repeated random tokens: variants (a registry), protocols and scores."""

from attnlab.induction.protocols import TokenSpec, make_protocol, token_spec_for
from attnlab.induction.scores import InductionScores, induction_scores
from attnlab.induction.variants import RRTBatch, Variant, get_variant, list_variants, register_variant

__all__ = [
    "TokenSpec", "make_protocol", "token_spec_for", "InductionScores", "induction_scores",
    "RRTBatch", "Variant", "get_variant", "list_variants", "register_variant",
]
