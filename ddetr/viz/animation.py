"""Animations and slider views that play in the static HTML book and in Jupyter,
offline, with no kernel running.

They are matplotlib's own JavaScript player (``FuncAnimation.to_jshtml``): every frame
is drawn by matplotlib, saved as a PNG (or JPEG) and embedded in the page as base64, and a
player of about 6 KB of inline script (matplotlib's template) shows one frame at a
time, with a slider, play/pause/step buttons and loop modes. The same slider is what
makes a view explorable: when each frame is one query (or one image position), moving
the slider picks the query. Why this and not Plotly or Bokeh: no new dependency, no
JavaScript library on the page (Plotly's bundle is about 4.6 MB per page unless served
separately), the figures are the book's other matplotlib figures, and the output is
plain HTML that Jupyter and Jupyter Book both show as it is. What it costs: the PNGs,
so a view's weight is its frame count times a frame's size (``Animation.frame_bytes``
says it); the views keep frames small (a few inches at 72 dpi).

matplotlib's template draws its buttons with Font Awesome icons linked from a CDN. A
book read offline must make no network request, so ``animate`` removes that link and
writes each button's icon as a text symbol instead (the buttons keep their titles).
"""
import re

import matplotlib.pyplot as plt
from matplotlib import animation as mpl_animation

_CDN_LINK = re.compile(r'<link rel="stylesheet"\s+href="https?://[^"]*font-awesome[^"]*">')
_ICON = re.compile(r'<i class="fa ([^"]+)"></i>')
_ICON_TEXT = {
    "fa-minus": "&minus;", "fa-fast-backward": "|&#9664;&#9664;",
    "fa-step-backward": "|&#9664;", "fa-play fa-flip-horizontal": "&#9664;",
    "fa-pause": "&#10074;&#10074;", "fa-play": "&#9654;", "fa-step-forward": "&#9654;|",
    "fa-fast-forward": "&#9654;&#9654;|", "fa-plus": "+",
}


def offline_player(html):
    """matplotlib's jshtml with no link to a CDN and text symbols for the icons."""
    html = _CDN_LINK.sub("", html)

    def icon(match):
        if match.group(1) not in _ICON_TEXT:
            raise ValueError(f"unknown player icon {match.group(1)!r} in matplotlib's "
                             f"animation template")
        return f'<span class="ddetr-anim-icon">{_ICON_TEXT[match.group(1)]}</span>'
    return _ICON.sub(icon, html)


class Animation:
    """An animation as offline HTML: shown by Jupyter and Jupyter Book through
    ``_repr_html_``; ``html`` is the page fragment, ``frames`` the frame count,
    ``frame_bytes`` the mean size of one embedded frame."""

    def __init__(self, html, frames):
        self.html, self.frames = html, frames
        embedded = re.findall(r'frames\[\d+\] = "data:image/\w+;base64,([^"]*)"', html)
        self.frame_bytes = sum(len(f) for f in embedded) / max(len(embedded), 1)

    def _repr_html_(self):
        return self.html

    def __repr__(self):
        return (f"<Animation: {self.frames} frames, {len(self.html) / 1024:.0f} KB of "
                f"HTML>")


def animate(fig, draw, frames, interval=400, mode="loop", dpi=72, frame_format="png"):
    """Play draw(0), draw(1), ... draw(frames - 1) on fig as an offline HTML animation.

    Args:
        fig: the matplotlib Figure; draw(i) changes its artists for frame i.
        frames: how many frames; interval: milliseconds per frame when playing;
        mode: "loop", "once" or "reflect" (the player's initial repetition mode).
        dpi: resolution of the embedded frames; frame_format: "png" (flat drawings)
            or "jpeg" (photographs, where PNG would be several times larger).

    Returns an ``Animation``. The figure is closed (Jupyter would show it again).
    """
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if mode not in ("loop", "once", "reflect"):
        raise ValueError(f"mode must be 'loop', 'once' or 'reflect', got {mode!r}")
    if frame_format not in ("png", "jpeg"):
        raise ValueError(f"frame_format must be 'png' or 'jpeg', got {frame_format!r}")
    anim = mpl_animation.FuncAnimation(fig, draw, frames=frames, interval=interval,
                                       blit=False, repeat=False)
    with plt.rc_context({"savefig.dpi": dpi, "animation.embed_limit": 40,
                         "animation.frame_format": frame_format}):
        html = anim.to_jshtml(default_mode=mode)
    plt.close(fig)
    return Animation(offline_player(html), frames)
