"""Model organisms: small transformers trained here until they form induction heads (recipes, data, training,\nand how the heads form across checkpoints)."""
