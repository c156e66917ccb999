"""Induction maps on repeated random tokens: variants (a registry), protocols, scores, chance, null and verdict.

The experiment's record is ``attnlab.induction.experiment.INDUCTION``; names below are imported on first use.
"""

from attnlab.core.lazy import lazy_exports

_EXPORTS = {
    "TokenSpec": "attnlab.induction.protocols", "make_protocol": "attnlab.induction.protocols",
    "token_spec_for": "attnlab.induction.protocols",
    "InductionScores": "attnlab.induction.scores", "induction_scores": "attnlab.induction.scores",
    "RRTBatch": "attnlab.induction.variants", "Variant": "attnlab.induction.variants",
    "get_variant": "attnlab.induction.variants", "list_variants": "attnlab.induction.variants",
    "register_variant": "attnlab.induction.variants", "replace_spans": "attnlab.induction.variants",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
