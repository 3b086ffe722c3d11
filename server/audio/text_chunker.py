"""Sans-I/O incremental text chunker for streaming TTS.

Text arrives token by token from an LLM ("Hel", "lo", " world", ". How", ...); the chunker
hands back pieces a TTS model can speak on their own, as early as it safely can:

* A chunk ends at a sentence boundary: ``. ! ? …`` (plus closing quotes/brackets) followed by
  whitespace, a line break, or the CJK full stop, exclamation and question marks and the
  Devanagari danda ``।`` (which need no whitespace after them).
* A ``.``/``…`` followed by a lowercase word is not a boundary ("etc. and", "e.g. apples",
  "wait... what"), nor is the dot of a title or dotted abbreviation ("Dr.", "Mr.", "e.g.",
  "U.S.", initials "J.") or of "No."/"Vol."/"p." before a number. Punctuation not followed by
  whitespace never ends anything, so "3.14", "1,000", "$5.99", URLs and e-mails stay whole.
* A text longer than the limit (``max_chars``, and ``max_tokens`` when set) without a
  sentence end is cut at the last clause boundary (comma, semicolon, colon, em/en dash, a
  closing bracket/quote, or their CJK forms) before the limit, else at the last whitespace
  (avoiding the one inside "Dr. Smith"/"No. 5" when possible), and only inside a word when a
  single word exceeds the limit. A chunk never exceeds either limit.

Decisions that depend on what comes next (is "3." followed by "14"? is "etc. " followed by a
lowercase word?) wait for that input, so chunking is identical however the text is split into
pieces. Whitespace is normalised: every run becomes one space (a run containing a line break
is kept as a break, which ends a sentence, then spoken as a space), and chunk edges are
stripped; so the chunks, joined with the spaces dropped at their edges, are exactly the input
with its whitespace normalised (`normalize_whitespace`).

Tokens are approximated deterministically by `count_tokens`: every run of word characters
(letters, digits, underscore, and combining marks so that Devanagari words stay whole) is one
token, and every other non-space character is one token. Real BPE tokenizers split long or
rare words further, so configure ``max_tokens`` with some headroom.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["TextChunker", "count_tokens", "normalize_whitespace"]


def _mark_class() -> str:
    # Python's \w does not include combining marks (Devanagari vowel signs are Mc/Mn), which
    # would make "हिंदी" five tokens; the BMP's marks are enough for the scripts TTS serves.
    ranges: list[str] = []
    start: int | None = None
    for cp in range(0x300, 0x10001):
        is_mark = cp < 0x10000 and unicodedata.category(chr(cp))[0] == "M"
        if is_mark and start is None:
            start = cp
        elif not is_mark and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{cp - 1:04x}")
            start = None
    return "".join(ranges)


_MARKS: Final = _mark_class()
_TOKEN: Final = re.compile(rf"[\w{_MARKS}]+|[^\w\s{_MARKS}]")
_WS_RUN: Final = re.compile(r"\s+")
_LINE_BREAKS: Final = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")

# Terminators that end a sentence only when whitespace follows (Latin, Arabic script).
_SPACED_TERMS: Final = ".!?…‽؟۔"  # noqa: RUF001
# Terminators that end a sentence wherever they are (CJK, Devanagari danda).
_BARE_TERMS: Final = "。！？｡।॥"  # noqa: RUF001
_CLOSERS: Final = "\"'”’»›)]}」』】〕》〉"  # noqa: RUF001
_SENTENCE: Final = re.compile(
    rf"(?P<term>[{re.escape(_SPACED_TERMS + _BARE_TERMS)}]+)"
    rf"(?P<close>[{re.escape(_CLOSERS)}]*)|(?P<nl>\n)"
)
# Clause marks that are a cut point when whitespace follows them.
_CLAUSE_SPACED: Final = frozenset(",;:—–،" + _CLOSERS)  # noqa: RUF001
# Clause marks that are a cut point wherever they are.
_CLAUSE_BARE: Final = frozenset("，、；：")  # noqa: RUF001
_DASHES: Final = frozenset("—–")  # noqa: RUF001

# A dot after these never ends a sentence: they introduce what follows.
_ABBREV_ALWAYS: Final = frozenset(
    "mr mrs ms mx dr prof rev hon gen col capt lt sgt cpl gov sen rep pres fr st mt ft "
    "vs cf viz approx ca e.g i.e".split()
)
# A dot after these does not end a sentence when a number follows ("No. 5", "p. 12").
_ABBREV_BEFORE_NUMBER: Final = frozenset(
    "no nos nr vol vols p pp art fig figs ch sec op eq".split()
)
_DOTTED: Final = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # "U.S", "e.g", "a.m" (last dot apart)
_OPENERS: Final = "\"'“‘«‹([{"  # noqa: RUF001
_URL_OR_EMAIL: Final = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.IGNORECASE
)
_NUMBER_PUNCT: Final = frozenset(".,:$€£¥₹%")


def count_tokens(text: str) -> int:
    """Approximate token count (see the module docstring); deterministic and cheap."""
    return sum(1 for _ in _TOKEN.finditer(text))


def normalize_whitespace(text: str) -> str:
    """What the chunks of `text` add up to: every whitespace run one space, ends stripped."""
    return _WS_RUN.sub(" ", text).strip()


def _collapse(match: re.Match[str]) -> str:
    return "\n" if any(c in _LINE_BREAKS for c in match.group()) else " "


def _word_start(buf: str, end: int) -> int:
    start = end
    while start > 0 and buf[start - 1] not in " \n":
        start -= 1
    return start


def _abbreviation_dot(buf: str, dot: int, following: str) -> bool:
    """True when the '.' at `dot` belongs to an abbreviation that must not end a sentence."""
    start = _word_start(buf, dot)
    word = buf[start:dot].lstrip(_OPENERS)
    if word.isdigit() and (start == 0 or buf[start - 1] == "\n"):
        return True  # a list item number: "1. Open it" (the buffer starts at a sentence)
    low = word.lower()
    if low in _ABBREV_ALWAYS or _DOTTED.fullmatch(word):
        return True
    if len(word) == 1 and word.isupper():  # an initial: "J. R. R. Tolkien"
        return True
    return low in _ABBREV_BEFORE_NUMBER and following.isdigit()


def _sentence_verdict(buf: str, m: re.Match[str], final: bool) -> bool | None:
    """Is this terminator a sentence end? None: it depends on text not received yet."""
    end, n = m.end(), len(buf)
    if end == n:
        # More closers or digits ("3." + "14") may follow; at the very end it is an end.
        return True if final else None
    term = m.group("term")
    if buf[end] not in " \n":
        return any(c in _BARE_TERMS for c in term)
    if any(c not in ".…" for c in term):
        return True  # ? ! and the like need no look at the next word
    if end + 1 >= n:
        return True if final else None
    following = buf[end + 1]
    if following.islower():
        return False  # "etc. and", "e.g. apples", "well... maybe"
    if term == "." and not m.group("close") and _abbreviation_dot(buf, m.start(), following):
        return False
    return True


def _protected_space(buf: str, i: int) -> bool:
    """Whitespace at `i` sits inside "Dr. Smith", "e.g. this" or "No. 5"."""
    if i < 2 or buf[i - 1] != "." or i + 1 >= len(buf):
        return False
    return _abbreviation_dot(buf, i - 1, buf[i + 1])


def _splittable(a: str, b: str) -> bool:
    """May a word that exceeds the limit be hard-cut between characters a and b?"""
    if unicodedata.category(b)[0] == "M":
        return False  # never separate a base letter from its vowel sign or accent
    if a.isalnum() and b.isalnum():
        return False
    if a.isdigit() and b in _NUMBER_PUNCT:
        return False
    return not (a in _NUMBER_PUNCT and b.isdigit())


class TextChunker:
    """Incremental chunker; see the module docstring for the rules.

    `min_chars`: a sentence shorter than this is joined to the next one (a lone "Hi." makes
    choppy speech on some engines); it never makes a chunk exceed the limits.
    """

    __slots__ = (
        "_buf",
        "_scan_from",
        "_short_ends",
        "_tok_count",
        "_tok_limit",
        "_tok_pos",
        "max_chars",
        "max_tokens",
        "min_chars",
    )

    def __init__(self, max_chars: int, max_tokens: int | None = None, *, min_chars: int = 1):
        if max_chars < 1:
            raise ValueError("max_chars must be >= 1")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 (or None)")
        if min_chars < 1:
            raise ValueError("min_chars must be >= 1")
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self.min_chars = min_chars
        # Normalised: no leading whitespace, every whitespace run a single " " or "\n".
        self._buf = ""
        self._reset_scan()

    def _reset_scan(self) -> None:
        # What earlier calls learnt about the buffer, so a push costs O(new text), not
        # O(buffer): sentence candidates before _scan_from are decided (the short ends among
        # them, too short for min_chars, are kept for _cut); _tok_count tokens start before
        # _tok_pos, and _tok_limit is where the (max_tokens + 1)-th token starts, once seen.
        self._scan_from = 0
        self._short_ends: list[int] = []
        self._tok_pos = 0
        self._tok_count = 0
        self._tok_limit: int | None = None

    @property
    def buffered(self) -> str:
        """Text received but not yet returned in a chunk (whitespace-normalised)."""
        return self._buf

    def push(self, text: str) -> list[str]:
        """Add text; return the chunks that are complete now (possibly none)."""
        if text:
            buf = self._buf
            if buf and buf[-1] in " \n" and text[0].isspace():
                # Re-collapse across the push boundary so " " + "\n" stays one break.
                text, buf = buf[-1] + text, buf[:-1]
                self._scan_from = min(self._scan_from, len(buf))  # " " may become "\n"
            text = _WS_RUN.sub(_collapse, text)
            self._buf = buf + (text if buf else text.lstrip())
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """Everything buffered as chunks (the end of the text is known now), within limits."""
        return self._drain(final=True)

    def clear(self) -> None:
        """Drop the buffered text (barge-in)."""
        self._buf = ""
        self._reset_scan()

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while (chunk := self._next_chunk(final)) is not None:
            if chunk:
                out.append(chunk)
        return out

    def _limit(self, buf: str) -> int:
        """The largest end index such that buf[:end] is within both limits."""
        if self.max_tokens is None:
            return self.max_chars
        if self._tok_limit is None:
            count, last_start = self._tok_count, -1
            for tok in _TOKEN.finditer(buf, self._tok_pos, self.max_chars + 1):
                if count == self.max_tokens:
                    # A cut inside a token still counts it, so the end must come before it.
                    self._tok_limit = tok.start()
                    break
                count, last_start = count + 1, tok.start()
            else:
                if last_start >= 0:
                    # The last token may still grow ("Hel" + "lo"): count it again next time.
                    self._tok_pos, self._tok_count = last_start, count - 1
        if self._tok_limit is None:
            return self.max_chars
        return min(self.max_chars, self._tok_limit)

    def _chunk_len(self, buf: str, end: int) -> int:
        return len(buf[:end].rstrip())

    def _next_chunk(self, final: bool) -> str | None:
        buf = self._buf
        if not buf:
            return None
        limit = self._limit(buf)
        n = len(buf)
        for m in _SENTENCE.finditer(buf, self._scan_from):
            if m.group("nl"):
                verdict: bool | None = True
                end = m.start()
            else:
                verdict, end = _sentence_verdict(buf, m, final), m.end()
            if verdict is None:
                break  # undecided only happens at the end of the buffer: wait for more
            if verdict and end > limit:
                break  # too long for one chunk: the cut below handles it
            self._scan_from = m.end()
            if verdict:
                if self._chunk_len(buf, end) >= self.min_chars:
                    return self._take(end)
                self._short_ends.append(end)
        else:
            self._scan_from = n  # no terminator left to look at in what is buffered
        # Waiting for two characters past the limit means every boundary before the limit is
        # decided, so the cut does not depend on how the text was split into pushes.
        if n > limit + 1 or (final and n > limit):
            return self._take(self._cut(buf, limit, self._short_ends))
        if final:
            return self._take(n)
        return None

    def _cut(self, buf: str, limit: int, short_ends: list[int]) -> int:
        """Where to end a chunk that cannot reach a sentence end within `limit`."""
        spans = [m.span() for m in _URL_OR_EMAIL.finditer(buf, 0, limit + 1)]

        def in_span(pos: int) -> bool:
            return any(s < pos < e for s, e in spans)

        clause = 0
        any_cut = max((e for e in short_ends if e <= limit), default=0)
        protected = 0
        for i in range(min(limit, len(buf) - 1), 0, -1):
            c = buf[i]
            if c in " \n":
                if _protected_space(buf, i):
                    protected = max(protected, i)
                else:
                    any_cut = max(any_cut, i)
                continue
            end = i + 1
            if end > limit:
                continue
            nxt = buf[end] if end < len(buf) else " "
            is_clause = (c in _CLAUSE_SPACED and nxt in " \n") or (
                (c in _CLAUSE_BARE or c in _DASHES)
                and not in_span(end)
                and not (c in _DASHES and buf[i - 1].isdigit() and nxt.isdigit())
            )
            if not is_clause:
                continue
            if self._chunk_len(buf, end) >= self.min_chars:
                clause = end
                break  # the last clause boundary wins; nothing later can beat it
            any_cut = max(any_cut, end)
        if clause:
            return clause
        if any_cut:
            return any_cut
        if protected:
            return protected
        return self._hard_cut(buf, limit)

    @staticmethod
    def _hard_cut(buf: str, limit: int) -> int:
        # One "word" longer than the limit: prefer a point between punctuation and a letter
        # (inside a URL, after "/" or "-") in the second half of the window, never between a
        # letter and its combining mark or inside a number.
        for end in range(limit, max(1, limit // 2), -1):
            if _splittable(buf[end - 1], buf[end]):
                return end
        end = limit
        while end > 1 and unicodedata.category(buf[end])[0] == "M":
            end -= 1
        return end

    def _take(self, end: int) -> str:
        buf = self._buf
        self._buf = buf[end:].lstrip()
        # Rescan what is left once: verdicts look back to the buffer start ("1." opening a
        # list item), which just moved.
        self._reset_scan()
        return buf[:end].rstrip().replace("\n", " ")
