"""Splitting a long answer into messages a channel accepts (its provider's `message_limit`).

Pure. A cut goes at the last paragraph break that fits, else the last line break, else the last
sentence end, else the last space; only a single word longer than the limit is cut inside. Parts
are stripped (whitespace at a cut point is the only thing lost), never empty, in order.
"""

from __future__ import annotations

import re

from ..providers import for_channel
from ..providers.manychat import MANYCHAT_LIMIT
from ..providers.wati import WATI_LIMIT

__all__ = ["MANYCHAT_LIMIT", "WATI_LIMIT", "limit_for", "split_message"]

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_LINE = re.compile(r"\n\s*")
# a sentence ends with . ! ? … (possibly repeated, possibly followed by closing quotes or brackets)
_SENTENCE = re.compile(r"[.!?…。]+[\"'\u201d\u2019»)\]]*\s+")
_SPACE = re.compile(r"\s+")
_LEVELS = (_PARAGRAPH, _LINE, _SENTENCE, _SPACE)


def _cut(text: str, limit: int) -> tuple[int, int]:
    """(end of this part, start of the rest) for a text longer than `limit` (text[0] not space)."""
    for pattern in _LEVELS:
        best: tuple[int, int] | None = None
        for match in pattern.finditer(text, 0, limit + 1):
            # for sentences the punctuation stays with the part; for the others the break is dropped
            end = match.start() if pattern is not _SENTENCE else match.end()
            part_end = len(text[:end].rstrip())
            if 0 < part_end <= limit:
                best = (part_end, match.end())
        if best is not None:
            return best
    return limit, limit


def split_message(text: str, limit: int) -> list[str]:
    """Splits `text` into stripped, non-empty parts of at most `limit` characters."""
    if limit < 1:
        raise ValueError("limit must be >= 1")
    parts: list[str] = []
    rest = text.strip()
    while rest:
        if len(rest) <= limit:
            parts.append(rest)
            break
        end, start = _cut(rest, limit)
        part = rest[:end].rstrip()
        if part:
            parts.append(part)
        rest = rest[start:].lstrip()
    return parts


def limit_for(channel: str) -> int:
    """The message length limit of a channel (`wati`, `facebook`, `instagram`): its provider's."""
    return for_channel(channel).message_limit(channel)
