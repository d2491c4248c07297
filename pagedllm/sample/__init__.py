"""Token sampling: per-step metadata, logits processors and the batched sampler."""
