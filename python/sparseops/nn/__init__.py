"""Drop-in modules built on the public sparseops functions."""

from .router import RouterOutput, TopKRouter

__all__ = ["RouterOutput", "TopKRouter"]
