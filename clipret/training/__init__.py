"""Training: LLRD parameter groups, warmup-cosine schedule, loss wiring, the loop, checkpoints."""
