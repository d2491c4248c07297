"""Pure-Python bookkeeping of requests, blocks and scheduling (no torch.cuda, no model code)."""
