"""Make ``bdl.lastlayer`` importable under a plain ``pytest`` run.

Without ``rootdir`` on ``sys.path`` (``pytest`` rather than ``python -m pytest``), pytest's
default ``prepend`` import mode puts ``tests/`` on the path, and the directory
``tests/bdl/lastlayer`` then shadows the package ``bdl.lastlayer`` as a namespace package (the
editable-install finder runs after the path finder). Putting the repository root first makes
the real package win. Harmless when the root is already on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[3])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
