"""README's test command is the one CI runs (.ci/run), and it shows skip reasons."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _test_command(text: str) -> str:
    found = re.findall(r"^\s*(pip install .*\[test\].*&& python -m pytest.*)$", text,
                       flags=re.MULTILINE)
    assert len(found) == 1, found
    return found[0].strip()


def test_readme_test_command_is_what_ci_runs():
    readme = _test_command((REPO / "README.md").read_text())
    ci = _test_command((REPO / ".ci" / "run").read_text())
    assert readme == ci
    assert " -rs" in ci                                   # skip reasons are shown
    assert "ORGNN_SHARED_DATA" in (REPO / "README.md").read_text()
