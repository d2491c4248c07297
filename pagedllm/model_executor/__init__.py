"""Model execution: layers, model families, weight loaders."""
