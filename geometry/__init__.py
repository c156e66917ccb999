"""Query/key geometry and pattern/message projections."""
