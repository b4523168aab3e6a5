"""Sphinx configuration for the orgnn documentation.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout, installed or not

import orgnn  # noqa: E402

project = "orgnn"
author = "the orgnn authors"
copyright = "2026, the orgnn authors"
release = orgnn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"orgnn {release}"
html_static_path = ["_static"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shapes", "params_style")]
nitpicky = False
suppress_warnings = ["myst.header"]

#: Pages other engineers write; each is in the table of contents when its file exists.
OPTIONAL_PAGES = ("benchmarks", "image_side")


def _optional_toctree() -> str:
    pages = [p for p in OPTIONAL_PAGES if (DOCS / f"{p}.md").is_file()
             or (DOCS / f"{p}.rst").is_file()]
    if not pages:
        return ""
    lines = ["", ".. toctree::", "   :maxdepth: 2", "   :caption: More", ""]
    return "\n".join(lines + [f"   {p}" for p in pages]) + "\n"


def _cli_help() -> str:
    """``orgnn --help`` and every sub-command's ``--help``, as literal blocks."""
    import argparse
    import os

    from orgnn.cli import build_parser

    os.environ.setdefault("COLUMNS", "92")  # argparse wraps to the terminal width
    parser = build_parser()
    blocks = [("orgnn", parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                blocks.append((f"orgnn {name}", sub.format_help()))
    out = []
    for title, text in blocks:
        out += [title, "-" * len(title), "", ".. code-block:: text", ""]
        out += ["   " + line if line else "" for line in text.rstrip().splitlines()]
        out.append("")
    return "\n".join(out)


def _source_read(app, docname: str, source: list[str]) -> None:
    if docname == "index":
        source[0] = source[0].replace(".. optional-pages", _optional_toctree())
    elif docname == "cli":
        source[0] = source[0].replace(".. orgnn-cli-help", _cli_help())


def setup(app) -> None:
    app.connect("source-read", _source_read)
