"""Shared vision core of the workbench: backbones, layers, runtime, logging, checkpoints, CLI.

No algorithm lives here; the agent and adaptation families import from it.
"""

__version__ = "0.1.0"
