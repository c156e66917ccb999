"""Query/key geometry (scaling constants, UMAP) and pattern/message projections; records in
``attnlab.geometry.experiment``."""
