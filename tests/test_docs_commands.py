"""Every command of each docs/*.md page's ```bash blocks runs as shown, in order, in a fresh folder per page, and
exits as documented (tests/doc_commands.py). A page is one test; pages with many commands can move to files of
their own so pytest-xdist (--dist loadfile) spreads them."""

import pytest

from .doc_commands import doc_pages, run_page

pytestmark = pytest.mark.slow  # every docs page's commands, in the default run (CI)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_docs_page_commands_run_as_documented(page, tmp_path):
    run_page(page, tmp_path)
