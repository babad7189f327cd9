"""Put this directory on sys.path so the tests can share ``ds_lora_testing``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
