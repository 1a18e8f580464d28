"""HMAR: VAR split into base and branch blocks, Markovian across scales, with masked refinement within a scale."""
