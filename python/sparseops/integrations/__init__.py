"""Integrations with other libraries; each submodule imports nothing of its library itself.

- ``sparseops.integrations.transformers``: ``patch(model)`` swaps the sparse MoE blocks of
  Hugging Face transformers models for ``sparseops.nn.MoE``.
- ``sparseops.integrations.pylate``: ``colbert_scores`` / ``colbert_scores_pairwise`` /
  ``colbert_kd_scores`` / ``ColBERTScores`` with PyLate's signatures on the MaxSim ops, and
  ``patch()`` / ``unpatch()`` to make PyLate use them.
- ``sparseops.integrations.colpali``: colpali-engine's ``score_multi_vector``,
  ``maxsim_inbatch`` and ``maxsim_kd``, and ``patch()`` / ``unpatch()``.
"""

__all__ = ["colpali", "pylate", "transformers"]
