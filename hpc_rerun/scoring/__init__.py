"""Scoring, torch-free: the benchmark's metrics (``metrics``), its rule for plotting code and charts
(``charts``), and the sandbox that runs model-written code under the kernel's confinement (``sandbox``).

Login-node steps (merge, rescore) and the worker score through this package; none of it imports torch or
transformers.
"""
