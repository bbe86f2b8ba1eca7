"""Every Python example on the concept pages (docs/concepts/*.md) runs, and prints what it shows.

Each ```python block runs on its own, as a fresh module (so pydantic models and dataclasses
defined in it resolve their annotations), in memory: the harness, the in-memory store and the
fake clock, no broker and no database. A block whose first line is ``# not run`` is skipped
(it needs a real database or broker; it was checked by hand). A ```text block that directly
follows a Python block (blank lines aside) is that example's expected output, compared exactly.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

CONCEPTS = Path(__file__).resolve().parents[2] / "docs" / "concepts"
OWN_PAGES = (
    "steps.md",
    "compensation.md",
    "timeouts-and-retries.md",
    "idempotency.md",
    "operations.md",
)
"""The pages that must show at least one runnable example."""

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_SKIP = "# not run"


@dataclass(frozen=True)
class Example:
    """One Python block of a concept page, with its expected output if the page shows one."""

    page: str
    line: int
    code: str
    output: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def extract(page: Path) -> list[Example]:
    """The runnable Python blocks of ``page``, in order."""
    text = page.read_text("utf-8")
    blocks = list(_FENCE.finditer(text))
    found: list[Example] = []
    for index, block in enumerate(blocks):
        language, code = block.group(1), block.group(2)
        if language != "python" or code.lstrip().startswith(_SKIP):
            continue
        output = None
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if (
            following is not None
            and following.group(1) == "text"
            and not text[block.end() : following.start()].strip()
        ):
            output = following.group(2)
        line = text.count("\n", 0, block.start()) + 2  # the block's first line of code
        found.append(Example(page.name, line, code, output))
    return found


EXAMPLES = [example for page in sorted(CONCEPTS.glob("*.md")) for example in extract(page)]


def run(example: Example) -> str:
    """Run ``example`` as a fresh module and return what it printed."""
    name = "docs_example_" + re.sub(r"\W", "_", example.name)
    module = types.ModuleType(name)
    module.__file__ = str(CONCEPTS / example.page)
    sys.modules[name] = module
    printed = io.StringIO()
    try:
        code = compile(example.code, example.name, "exec")
        with contextlib.redirect_stdout(printed):
            exec(code, module.__dict__)  # noqa: S102 - running our own documentation is the point
    finally:
        del sys.modules[name]
    return printed.getvalue()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.name)
def test_concept_page_example_runs_and_prints_what_the_page_shows(example: Example) -> None:
    printed = run(example)
    if example.output is not None:
        assert printed == example.output, f"{example.name} printed:\n{printed}"


def test_every_concept_page_has_a_runnable_example() -> None:
    pages = {example.page for example in EXAMPLES}
    assert [page for page in OWN_PAGES if page not in pages] == []


def test_extract_skips_not_run_blocks_and_pairs_output_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nprint('hi')\n```\n\n```text\nhi\n```\n\n"
        "```python\n# not run\nimport nowhere\n```\n\n```python\nx = 1\n```\n\nprose\n\n"
        "```text\nnot an output\n```\n",
        "utf-8",
    )
    examples = extract(page)
    assert [(e.line, e.code, e.output) for e in examples] == [
        (4, "print('hi')\n", "hi\n"),
        (17, "x = 1\n", None),
    ]
