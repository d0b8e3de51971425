"""Sphinx configuration for bdlgp (packages ``bdl`` and ``gp``).

Builds offline and strictly (CI runs ``python -m sphinx -W --keep-going -b html -q docs
docs/_build/html``): only extensions shipped with Sphinx, no intersphinx, nothing executed,
no generated stub files (the API pages use ``automodule``/``autoclass`` directly and
``autosummary`` tables without ``:toctree:``).
"""

from __future__ import annotations

import os
import sys

# The package is normally installed (editable) in the environment; fall back to the source
# tree so that a clean clone can build the docs without installing first.
sys.path.insert(0, os.path.abspath(".."))

import bdl  # noqa: E402

project = "bdlgp"
author = "bdlgp developers"
copyright = "bdlgp developers"
release = bdl.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
nitpicky = False
default_role = "literal"  # a stray `x` in a docstring renders as code, never a broken ref

# -- autodoc / autosummary -------------------------------------------------------------------
autosummary_generate = False  # no stub files: every object is documented in the api/ pages
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
autodoc_default_options: dict[str, object] = {}  # members are asked for per directive

# -- napoleon (NumPy style) -----------------------------------------------------------------
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_param = True
napoleon_use_rtype = True
napoleon_use_ivar = False
napoleon_preprocess_types = False
# free-form sections used in module docstrings, rendered as a rubric plus their text
napoleon_custom_sections = ["Shapes"]

# -- HTML ---------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"bdlgp {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Bayesian deep learning and GPs on PyTorch, one posterior interface",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_sidebars = {
    "**": ["about.html", "navigation.html", "relations.html", "searchbox.html"],
}
