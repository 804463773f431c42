"""Second stage: an autoregressive transformer over VQGAN code grids."""
