"""Causal and weight-based evidence about heads: ablation and patching through the one hook point, the
``rrt`` copying task and prefix-reusing head scans, OV copying and composition scores."""

from attnlab.circuits.ablation import MODES, ablate, head_outputs, parse_heads

__all__ = ["MODES", "ablate", "head_outputs", "parse_heads"]
