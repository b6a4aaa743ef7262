"""The optimizers, the guarded (clipped, non-finite-skipping) step, the LR schedule."""
