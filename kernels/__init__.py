"""Triton kernels of sparseops, installed as ``sparseops.kernels``: @triton.jit code and launch tables."""
