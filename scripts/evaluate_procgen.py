#!/usr/bin/env python
"""Evaluate a Procgen checkpoint on unseen levels; writes mean return and normalised score as JSON."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agents.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
