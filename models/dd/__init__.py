"""Distilled Decoding (DD): VAR distilled to one or two steps from noise."""
