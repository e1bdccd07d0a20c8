#!/usr/bin/env python
"""Train an agent on a Procgen game and evaluate it on unseen levels (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from agents.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
