"""FlexVAR: scale-wise generation that predicts each scale's image rather than the residual (jiaosiyu1999/FlexVAR)."""
