"""Engine: front-end processing (tokenize, detokenize, outputs) and the engine core loop."""
