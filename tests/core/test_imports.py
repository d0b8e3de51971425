"""Importing the spine or one GP family stays cheap: no scikit-learn, no other family."""

from __future__ import annotations

import subprocess
import sys

import pytest

FAMILIES = ("bdl.lastlayer", "bdl.sgmcmc", "bdl.ssvi", "gp.sparse", "gp.statespace")
HEAVY = ("sklearn", "scipy.stats", "botorch")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", ["import bdl.core", "import gp.exact", "import bdl, gp"])
def test_import_loads_no_heavy_module_and_no_method_family(statement):
    loaded = _loaded_after(statement)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    families = sorted(m for m in loaded if m.startswith(FAMILIES))
    assert heavy == [], f"{statement!r} loads {heavy[:5]}"
    assert families == [], f"{statement!r} loads {families[:5]}"


def test_public_names_resolve_lazily():
    import bdl
    import gp

    for name in bdl.__all__:
        assert getattr(bdl, name) is not None
    for name in gp.__all__:
        assert getattr(gp, name) is not None
    with pytest.raises(AttributeError, match="no attribute"):
        bdl.NotAName  # noqa: B018


@pytest.mark.parametrize("module", [*FAMILIES, "bdl.metrics"])
def test_families_load_scikit_learn_only_with_their_estimators(module):
    loaded = _loaded_after(f"import {module}")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert heavy == [], f"import {module} loads {heavy[:5]}"
