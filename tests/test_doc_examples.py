"""Every ```python block in README.md and docs/*.md runs as pasted.

Each page's blocks run in page order in one fresh interpreter (``python -c``), sharing one
namespace as a reader pasting them into one session would; a page passes when its last
block finishes without an exception. The interpreter is this flavour's, with this
checkout first on the path and the flavour's environment (``TF_USE_LEGACY_KERAS``,
``KERAS_BACKEND``) inherited, so the pages are checked on every flavour the suite runs on.

A block that must not run (it needs a file, a dataset or a GPU the page only names) is
preceded by the line ``<!-- not run: REASON -->`` (``<!-- not run on tf-keras: REASON -->``
for Keras 3 code such as KerasHub's, run on the Keras 3 flavours only); the reason is part
of the page's source and this test lists such blocks by name, so skipping one is a
visible decision. Doctest
style (``>>>``) belongs in ```pycon blocks, which are not run here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnfreeze._version import wants_tf_keras

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`]*)$")
_NOT_RUN = re.compile(r"^\s*<!-- not run(?P<where> on tf-keras)?: (?P<reason>.+?) -->\s*$")

#: The reason of a block kept from running on tf-keras only (Keras 3 code, KerasHub).
_ON_TF_KERAS = "on tf-keras: "

#: Each page runs in a child process; fail it if it takes longer than this.
TIMEOUT = 600

#: Pages run by a test file of their own (test_doc_examples_long.py) rather than by
#: ``test_every_python_block_runs_as_pasted`` here: each takes as long as all the other
#: pages together, so with ``--dist loadfile`` it runs on one worker while the rest run
#: on the other.
LONG_PAGES = [ROOT / "docs" / "fine-tuning-in-one-fit.md"]


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """The page's ```python blocks as (line number of the fence, code, reason not to run
    it or None), in page order; blocks of other languages are left out."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        language = opening["info"].strip().split(" ")[0] if opening["info"].strip() else ""
        end = next(
            (
                j
                for j in range(i + 1, len(lines))
                if lines[j].strip() == ticks and lines[j].startswith(indent)
            ),
            None,
        )
        assert end is not None, f"unclosed fence at line {i + 1}"
        if language == "python":
            body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
            previous = lines[i - 1] if i else ""
            skip = _NOT_RUN.match(previous)
            reason = None
            if skip:
                reason = ("on tf-keras: " if skip["where"] else "") + skip["reason"]
            blocks.append((i + 1, textwrap.dedent(body), reason))
        i = end + 1
    return blocks


def _program(page: Path) -> str:
    """The page's runnable blocks as one program, each announced on stderr by its line,
    so that a failure names the block it happened in."""
    parts = ["import sys"]
    tf_keras = wants_tf_keras()  # the package's reading of TF_USE_LEGACY_KERAS
    if tf_keras:
        # On tf-keras the reader writes `import tf_keras as keras`, as the pages say.
        parts.append("import tf_keras; sys.modules['keras'] = tf_keras")
    for line, code, reason in python_blocks(page.read_text()):
        if reason is None or (reason.startswith(_ON_TF_KERAS) and not tf_keras):
            parts.append(f"print('--- {page.name}:{line}', file=sys.stderr, flush=True)")
            parts.append(f"exec(compile({code!r}, {f'{page.name}:{line}'!r}, 'exec'))")
    return "\n".join(parts)


def test_the_parser_finds_blocks_and_markers():
    """The block parser returns python blocks only, in order, with their fence line,
    dedented code, and the reason of a `not run` marker on the line before."""
    page = textwrap.dedent(
        """\
        text
        ```python
        a = 1
        ```
        ```text
        not code
        ```
        <!-- not run: needs a GPU -->
        ```python
        b = 2
        ```
        <!-- not run on tf-keras: KerasHub -->
        ```python
        d = 3
        ```
        - item

            ```python
            c = a + 1
            ```
        """
    )
    assert python_blocks(page) == [
        (2, "a = 1", None),
        (9, "b = 2", "needs a GPU"),
        (13, "d = 3", "on tf-keras: KerasHub"),
        (18, "c = a + 1", None),
    ]


def run_page(page: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The page's python blocks, run in page order in one fresh interpreter (from an empty
    directory, so files they write stay there); the finished process."""
    if not any(reason is None for _, _, reason in python_blocks(page.read_text())):
        pytest.skip(f"{page.name} has no python block to run")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    result = subprocess.run(
        [sys.executable, "-c", _program(page)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=TIMEOUT,
    )
    return result


SHORT_PAGES = [page for page in PAGES if page not in LONG_PAGES]


@pytest.mark.pages
@pytest.mark.parametrize("page", SHORT_PAGES, ids=[str(p.relative_to(ROOT)) for p in SHORT_PAGES])
def test_every_python_block_runs_as_pasted(page: Path, tmp_path: Path) -> None:
    """The page's python blocks, run in page order in one fresh interpreter (from an empty
    directory, so files they write stay there), finish without an exception (the pages
    of ``LONG_PAGES`` in test_doc_examples_long.py)."""
    result = run_page(page, tmp_path)
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-4000:]}"


def test_every_page_is_run():
    """Every page is run, here or by test_doc_examples_long.py, and only once."""
    from tests.test_doc_examples_long import PAGES_RUN_THERE

    assert sorted(SHORT_PAGES + PAGES_RUN_THERE) == sorted(PAGES)
    assert set(LONG_PAGES) <= set(PAGES)


def test_blocks_not_run_are_few_and_say_why():
    """Every block kept from running says why; list them so a reader of the test output
    sees what the docs test does not cover."""
    skipped = [
        f"{page.name}:{line} ({reason})"
        for page in PAGES
        for line, _, reason in python_blocks(page.read_text())
        if reason is not None
    ]
    assert all(s.endswith(")") and "()" not in s for s in skipped), skipped
    assert len(skipped) <= 3, skipped
