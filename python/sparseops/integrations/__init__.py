"""Integrations with other libraries; each submodule imports nothing of its library itself.

- ``sparseops.integrations.transformers``: ``patch(model)`` swaps the sparse MoE blocks of
  Hugging Face transformers models for ``sparseops.nn.MoE``.
"""

__all__ = ["transformers"]
