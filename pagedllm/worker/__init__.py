"""Worker: owns the device, the model, the KV cache tensors, and runs one step at a time."""
