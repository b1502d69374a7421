"""docs/command-line.md's commands (the long list the README's front page links to), run as shown, in order, in a
fresh folder (tests/doc_commands.py); a file of its own so pytest-xdist runs it beside the README's."""

import pytest

from .doc_commands import ROOT, run_page

pytestmark = pytest.mark.slow  # every docs page's commands, in the default run (CI)
PAGE = ROOT / "docs" / "command-line.md"


@pytest.mark.skipif(not PAGE.is_file(), reason="docs/command-line.md comes with the README split (issue 26)")
def test_command_line_page_runs_as_documented(tmp_path):
    run_page(PAGE, tmp_path)
