"""The longest docs page, run exactly as test_doc_examples.py runs every other page.

A file of its own so that, with ``--dist loadfile``, it runs on one xdist worker while
the other pages run on the other (it takes about as long as all of them together).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_doc_examples import LONG_PAGES, ROOT, run_page

PAGES_RUN_THERE = list(LONG_PAGES)


@pytest.mark.pages
@pytest.mark.parametrize(
    "page", PAGES_RUN_THERE, ids=[str(p.relative_to(ROOT)) for p in PAGES_RUN_THERE]
)
def test_every_python_block_runs_as_pasted(page: Path, tmp_path: Path) -> None:
    """The page's python blocks, run in page order in one fresh interpreter (from an empty
    directory, so files they write stay there), finish without an exception."""
    result = run_page(page, tmp_path)
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-4000:]}"
