"""Show a piece of the library's source (C++, CUDA, Python) in a notebook, with line
numbers. Files are read from the installed ``ddetr`` package, so an excerpt shows the
code that runs, wherever the package is installed."""
from importlib import resources


def show_source(path, start, end=None, max_lines=60):
    """Numbered lines of a file of the ddetr package, e.g. ``"csrc/ms_deform_attn.h"``.

    The excerpt starts at the line where ``start`` begins and ends at the line where the
    first later occurrence of ``end`` ends (both are matched against the file's text,
    so a marker may span lines, e.g. ``"return c;\\n}"``), or after ``max_lines`` lines,
    whichever comes first; without ``end`` it is ``max_lines`` lines long. Raises
    ValueError if ``start``, or ``end`` after it, does not occur.

    Returns:
        the text "ddetr/<path>:<first>-<last>" and the numbered lines; print it.
    """
    parts = path.split("/")
    file = resources.files("ddetr").joinpath(*parts)
    if ".." in parts or "" in parts or not file.is_file():
        raise ValueError(f"path must name a file of the ddetr package, like "
                         f"'csrc/ms_deform_attn.h'; got {path!r}")
    text = file.read_text()
    lines = text.split("\n")
    found = text.find(start)
    if found < 0:
        raise ValueError(f"{start!r} does not occur in ddetr/{path}")
    first = text.count("\n", 0, found)
    last = min(first + max_lines, len(lines)) - 1
    if end is not None:
        # the first occurrence that begins on a line after the one start ends on
        newline = text.find("\n", found + len(start) - 1)
        at = -1 if newline < 0 else text.find(end, newline + 1)
        if at < 0:
            raise ValueError(f"{end!r} does not occur after {start!r} in ddetr/{path}")
        # the line of the marker's last character (a trailing newline belongs to the
        # line it ends)
        last = min(last, text.count("\n", 0, at + len(end) - 1))
    width = len(str(last + 1))
    body = "\n".join(f"{i + 1:>{width}}  {lines[i]}" for i in range(first, last + 1))
    return f"ddetr/{path}:{first + 1}-{last + 1}\n{body}"
