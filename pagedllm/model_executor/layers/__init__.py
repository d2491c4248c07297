"""Model building blocks, tensor-parallel and quantization ready."""
