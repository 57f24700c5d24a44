"""flexdit-export: compile a FlexDiT (or DiT) checkpoint into per-stage static graphs and a bundle.

Pipeline: checkpoints -> model -> schedule -> stages -> export -> bundle.
The runtimes (``runtimes/python``, ``runtimes/cpp``) consume only the bundle.
"""

__version__ = "0.1.0"
