"""The models: one packed forward per family, the family registry, and the transformers fallback.

This package's `__init__` imports nothing, so that the torch-free request side can read the
family registry (`toolkit.models.registry`) without importing torch."""
