"""Causal and weight-based evidence about heads: ablation and patching through the one hook point, the
``rrt`` copying task and prefix-reusing head scans, OV copying and composition scores, and the ``heads`` and
``ablate`` experiments (records in ``attnlab.circuits.experiment``)."""

from attnlab.core.lazy import lazy_exports

_EXPORTS = {name: "attnlab.circuits.ablation" for name in ("MODES", "ablate", "head_outputs", "parse_heads")}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
