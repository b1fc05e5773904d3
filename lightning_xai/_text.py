"""Text that reaches pictures, HTML pages and files: invisible characters made visible."""

from __future__ import annotations

import re

# characters that change how the text around them reads or renders, without showing: C0/C1 controls (NUL
# included), bidirectional embeddings, overrides and isolates (U+202E turns "exe.txt" into "txt.exe"), marks and
# zero-width characters
_HIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def visible_text(text: str, html: bool = False) -> str:
    r"""``text`` with invisible control, bidirectional and zero-width characters shown as ``<U+202E>`` markers.

    Tokens, cell names and titles reach HTML pages and pictures; a bidirectional override hidden in one would
    reorder what a reader sees, and NUL breaks files. Tab and newline are kept. With ``html=True`` the markers
    are escaped (``&lt;U+202E&gt;``), for text that is HTML already.

    Examples:
        >>> visible_text("safe\u202eexe.txt\x00")
        'safe<U+202E>exe.txt<U+0000>'
        >>> visible_text("<b>\u2066x</b>", html=True)
        '<b>&lt;U+2066&gt;x</b>'
    """
    opening, closing = ("&lt;", "&gt;") if html else ("<", ">")
    return _HIDDEN.sub(lambda match: f"{opening}U+{ord(match.group()):04X}{closing}", str(text))
