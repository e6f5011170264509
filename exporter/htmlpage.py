"""The HTML pages slm-export writes (bundle report.html, bench.html, the farm report): one skeleton,
one escaping rule, one way to embed a plot, one verdict box and one way to write a size.

Named htmlpage, not html: a script run from this folder would otherwise shadow the standard
library's ``html`` (which ``http.server`` and others import).
"""

from __future__ import annotations

import base64
import html
import io


def esc(value) -> str:
    """``value`` as HTML text; quotes too, so it is safe inside an attribute. Every value that comes
    from a model, a bundle, a device or a farm file goes through here (they are untrusted input)."""
    return html.escape(str(value), quote=True)


# The verdict box at the top of a page (class "verdict pass" or "verdict fail"): what to read first.
VERDICT_CSS = (".verdict{border:2px solid;border-radius:6px;padding:.4em 1em;margin:1em 0}.verdict h2{margin:.2em 0}"
               ".verdict.pass{border-color:#070;background:#f2fbf2}.verdict.fail{border-color:#b00;background:#fdf2f2}")


def page_head(title: str, width: str, css: str = "", cell_css: str = "") -> str:
    """The start of a page: doctype, charset, the escaped ``title`` and the shared stylesheet.

    ``width`` is the body's max-width; ``cell_css`` is appended to the table cells' rule and
    ``css`` (more rules, e.g. status colours) after it.
    """
    return (f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title>\n"
            f"<style>body{{font-family:sans-serif;max-width:{width};margin:2em auto}}table{{border-collapse:collapse}}"
            f"td,th{{border:1px solid #ccc;padding:2px 8px{cell_css}}}{css}</style>")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> str:
    """``fig`` as a base64 PNG (90 dpi, tight); the figure is closed (pyplot keeps every open one)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def img(png: str, alt: str) -> str:
    """An ``<img>`` embedding a base64 PNG from ``figure_png``, so the page is one self-contained file."""
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{png}'>"


def human_bytes(n) -> str:
    """A byte count as people read it: "920 B", "13.7 kB", "213.8 MB", "1.50 GB" (decimal units)."""
    n = float(n)
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6)):
        if abs(n) < 999.95 * scale:  # what would round to 1000.0 reads better in the next unit
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e9:.2f} GB"
