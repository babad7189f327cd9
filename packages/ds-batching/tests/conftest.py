"""Test modules share batching_testutils.py; importlib mode does not put this folder on sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
