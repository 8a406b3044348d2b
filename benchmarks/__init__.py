"""sparseops benchmarks: one shared harness (``_harness``), one script per op family.

Run everything that exists on the available device with ``python -m benchmarks.demo``;
regenerate tables and plots from recorded CSVs with ``python -m benchmarks.report DIR``.
"""
