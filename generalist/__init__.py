"""Stage 1: one model trained on every class (the paper's generalist)."""
