"""The book builds from a clean state, every notebook executes, and nothing warns."""
import re

import pytest
import yaml

from conftest import ROOT


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters") or []]
    return files


@pytest.mark.slow
def test_book_builds_without_warnings_and_renders_every_page(built_book):
    log = (ROOT / "_build" / "book-test.log").read_text()
    # Sphinx prints "path:line: WARNING: ..."; the kernels' own log lines
    # ("[IPKernelApp] WARNING | ...", e.g. about TCP transport) are not about the book.
    warnings = [line for line in log.splitlines()
                if re.search(r"\b(WARNING|ERROR|CRITICAL):", line)
                and not line.lstrip().startswith("[IPKernelApp]")]
    assert not warnings, "the book build printed:\n" + "\n".join(warnings[:30])
    for page in _toc_files():
        html = built_book / f"{page}.html"
        assert html.is_file(), f"{page} listed in _toc.yml was not rendered"
        text = html.read_text()
        # an executed notebook that raised would show a traceback in its output
        assert "Traceback (most recent call last)" not in text, f"{page} shows an error"
        # a cell ending in a plotting call that returns axes prints "<Axes: ...>"
        for stray in ("&lt;Axes", "&lt;matplotlib."):
            assert stray not in text, f"{page} prints a stray {stray[4:]}... line"


def test_every_chapter_notebook_is_in_the_table_of_contents():
    listed = set(_toc_files())
    notebooks = {f"notebooks/{p.stem}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks <= listed, f"not in _toc.yml: {sorted(notebooks - listed)}"
