"""Sphinx configuration: the API reference (autodoc, reST field lists in the docstrings) and the Markdown
guides (myst-parser). Built by ``make docs`` with warnings as errors."""

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))

import pyro_sde  # noqa: E402

project = "pyro_sde"
author = "pyro_sde developers"
copyright = "pyro_sde developers"
version = release = pyro_sde.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_mock_imports = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
nitpicky = False

_FIELD = re.compile(r"^:[^:\s][^:]*:")


def _end_field_lists(app, what, name, obj, options, lines):
    """A field list (``:param x: ...``) directly followed by an unindented paragraph: end the list with a
    blank line, as docutils requires (some docstrings continue with prose right after their fields)."""
    in_fields, i = False, 0
    while i < len(lines):
        line = lines[i]
        if _FIELD.match(line):
            in_fields = True
        elif not line.strip():
            in_fields = False
        elif in_fields and not line[0].isspace():
            lines.insert(i, "")
            in_fields = False
            i += 1
        i += 1


def setup(app):
    app.connect("autodoc-process-docstring", _end_field_lists)


html_theme = "alabaster"
html_static_path = []
html_title = f"pyro_sde {release}"
