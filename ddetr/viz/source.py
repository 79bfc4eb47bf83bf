"""Show a piece of a source file (C++, CUDA, Python) in a notebook, with line numbers."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def show_source(path, start, end=None, max_lines=60):
    """The lines of ``path`` (relative to the repository root) from the first line that
    contains ``start`` up to and including the first later line that contains ``end``
    (or ``max_lines`` lines), numbered. Returns the text; print it."""
    lines = (ROOT / path).read_text().splitlines()
    first = next((i for i, line in enumerate(lines) if start in line), None)
    if first is None:
        raise ValueError(f"{start!r} does not occur in {path}")
    last = min(first + max_lines, len(lines)) - 1
    if end is not None:
        last = next((i for i in range(first + 1, len(lines)) if end in lines[i]), last)
        last = min(last, first + max_lines - 1)
    width = len(str(last + 1))
    body = "\n".join(f"{i + 1:>{width}}  {lines[i]}" for i in range(first, last + 1))
    return f"{path}:{first + 1}-{last + 1}\n{body}"
