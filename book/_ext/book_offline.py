"""Small fixes that keep the rendered book free of browser console errors offline.

Jupyter Book 1.x writes some inline configuration scripts twice into every page
(sphinx-thebe's and sphinx-togglebutton's), and ``const THEBE_JS_URL`` declared twice is
a SyntaxError in the console (thebe itself is disabled in _config.yml). Once the HTML is
written, this extension removes every inline ``<script>`` line that repeats an earlier
one of the same page.
"""
import re
from pathlib import Path

_INLINE_SCRIPT = re.compile(r"^\s*<script>.*</script>\s*$")


def dedupe_inline_scripts(html):
    """The page with repeated one-line inline scripts removed (first kept)."""
    seen, lines = set(), []
    for line in html.splitlines(keepends=True):
        if _INLINE_SCRIPT.match(line):
            key = line.strip()
            if key in seen:
                continue
            seen.add(key)
        lines.append(line)
    return "".join(lines)


def _fix_pages(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    for page in Path(app.outdir).rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        fixed = dedupe_inline_scripts(text)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")


def setup(app):
    app.connect("build-finished", _fix_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
