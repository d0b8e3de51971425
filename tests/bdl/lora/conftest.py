import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

# the tests import the tiny model helpers as a top-level module
sys.path.insert(0, str(Path(__file__).parent))
