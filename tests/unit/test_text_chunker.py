# ruff: noqa: RUF001  (CJK punctuation and dashes are the point of these tests)
from __future__ import annotations

import itertools
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audio.text_chunker import TextChunker, count_tokens, normalize_whitespace


def chunk(text: str, pieces: list[str] | None = None, **kw: int | None) -> list[str]:
    """All chunks of `text` fed as `pieces` (default: 3-character tokens), then flushed."""
    c = TextChunker(**kw)  # type: ignore[arg-type]
    if pieces is None:
        pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    out: list[str] = []
    for piece in pieces:
        out += c.push(piece)
    return out + c.flush()


def boundaries(chunks: list[str], text: str) -> list[int]:
    """Chunk end offsets in the normalised text; asserts the chunks reassemble it exactly."""
    norm = normalize_whitespace(text)
    pos, ends = 0, []
    for ch in chunks:
        assert ch and ch == ch.strip() and "  " not in ch, repr(ch)
        assert norm.startswith(ch, pos), (norm[pos:], ch)
        pos += len(ch)
        ends.append(pos)
        if pos < len(norm) and norm[pos] == " ":
            pos += 1  # the whitespace dropped at a chunk edge
    assert pos == len(norm), (norm[pos:], chunks)
    return ends


# --- sentence boundaries -------------------------------------------------------------------------


def test_streamed_tokens_give_sentences_as_soon_as_decidable() -> None:
    c = TextChunker(max_chars=200)
    assert c.push("Hel") == []
    assert c.push("lo") == []
    assert c.push(" world") == []
    assert c.push(".") == []  # could still be "world.com" or a decimal
    assert c.push(" How") == ["Hello world."]
    assert c.buffered == "How"
    assert c.push(" are you?") == []
    assert c.push(" I") == ["How are you?"]
    assert c.push("'m fine!") == []
    assert c.flush() == ["I'm fine!"]
    assert c.buffered == ""


def test_question_and_exclamation_need_only_whitespace() -> None:
    c = TextChunker(max_chars=200)
    assert c.push("Really?") == []
    assert c.push(" ") == ["Really?"]
    assert c.push("Yes!\n") == ["Yes!"]


def test_closing_quotes_and_brackets_stay_with_their_sentence() -> None:
    assert chunk('He said "Stop." Then he left. (It was late.) Fine.', max_chars=200) == [
        'He said "Stop."',
        "Then he left.",
        "(It was late.)",
        "Fine.",
    ]


def test_line_break_ends_a_sentence() -> None:
    text = "Here are the steps:\n1. Open it\n2. Close it\n\nDone"
    assert chunk(text, max_chars=200) == [
        "Here are the steps:",
        "1. Open it",
        "2. Close it",
        "Done",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pi is 3.14 today. Next.", ["Pi is 3.14 today.", "Next."]),
        ("We sold 1,000 units. Next.", ["We sold 1,000 units.", "Next."]),
        ("It costs $5.99. Next.", ["It costs $5.99.", "Next."]),
        ("Version 2.0.1 is out. Next.", ["Version 2.0.1 is out.", "Next."]),
        ("Ask Dr. Smith now. Next.", ["Ask Dr. Smith now.", "Next."]),
        ("Ask Mr. Jones and Mrs. Jones. Next.", ["Ask Mr. Jones and Mrs. Jones.", "Next."]),
        ("Fruit, e.g. apples, is good. Next.", ["Fruit, e.g. apples, is good.", "Next."]),
        ("Fruit, i.e. Apples, is good. Next.", ["Fruit, i.e. Apples, is good.", "Next."]),
        ("The U.S. Army is big. Next.", ["The U.S. Army is big.", "Next."]),
        ("Pens, paper etc. are here. Next.", ["Pens, paper etc. are here.", "Next."]),
        ("Pens, paper etc. Then more.", ["Pens, paper etc.", "Then more."]),
        ("Room No. 5 is free. Next.", ["Room No. 5 is free.", "Next."]),
        ("No. I refuse. Next.", ["No.", "I refuse.", "Next."]),
        ("Read J. R. R. Tolkien. Next.", ["Read J. R. R. Tolkien.", "Next."]),
        ("Well... maybe not. Next.", ["Well... maybe not.", "Next."]),
        ("Wait… what? Next.", ["Wait… what?", "Next."]),
        (
            "See https://example.com/a.b?c=1. Then go.",
            ["See https://example.com/a.b?c=1.", "Then go."],
        ),
        ("Mail john.doe@example.com. Then go.", ["Mail john.doe@example.com.", "Then go."]),
        ("Meet at 5 p.m. today. Next.", ["Meet at 5 p.m. today.", "Next."]),
    ],
)
def test_no_boundary_inside_numbers_abbreviations_ellipses_urls(
    text: str, expected: list[str]
) -> None:
    assert chunk(text, max_chars=200) == expected
    # The same whatever the token split: one character at a time, and all at once.
    assert chunk(text, list(text), max_chars=200) == expected
    assert chunk(text, [text], max_chars=200) == expected


def test_hindi_danda_cjk_and_arabic() -> None:
    hindi = "मेरा नाम राम है। मैं दिल्ली में रहता हूँ। आप कैसे हैं?"
    assert chunk(hindi, max_chars=200) == [
        "मेरा नाम राम है।",
        "मैं दिल्ली में रहता हूँ।",
        "आप कैसे हैं?",
    ]
    # The danda needs no whitespace after it, like the CJK full stop.
    assert chunk("पहला।दूसरा", max_chars=200) == ["पहला।", "दूसरा"]
    assert chunk("你好。我很好！你呢？", max_chars=200) == ["你好。", "我很好！", "你呢？"]
    assert chunk("كيف حالك؟ أنا بخير.", max_chars=200) == ["كيف حالك؟", "أنا بخير."]


def test_hindi_tokens_keep_vowel_signs_in_the_word() -> None:
    assert count_tokens("हिंदी भाषा") == 2
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("$5.99") == 4


# --- limits --------------------------------------------------------------------------------------


def test_over_limit_cuts_at_last_clause_boundary() -> None:
    text = "one two, three four; five six seven eight nine ten"
    out = chunk(text, max_chars=25)
    assert out[0] == "one two, three four;"
    assert all(len(c) <= 25 for c in out)
    boundaries(out, text)


def test_over_limit_without_clause_cuts_at_last_whitespace() -> None:
    out = chunk("alpha bravo charlie delta echo foxtrot golf", max_chars=20)
    assert out == ["alpha bravo charlie", "delta echo foxtrot", "golf"]


def test_dash_and_bracket_are_clause_boundaries_but_not_in_number_ranges() -> None:
    out = chunk("pages 10–20 are long — really very long indeed", max_chars=30)
    assert out[0] == "pages 10–20 are long —"
    out = chunk("see the notes (all of them) for the full details", max_chars=30)
    assert out[0] == "see the notes (all of them)"


def test_over_limit_prefers_whitespace_outside_abbreviations() -> None:
    # The last space before the limit is the one in "Dr. Smith"; the one before it is used.
    out = chunk("I asked the doctor Dr. Smith yesterday", max_chars=24)
    assert out[0] == "I asked the doctor"
    out = chunk("this is room number No. 5 of ten", max_chars=24)
    assert out[0] == "this is room number"


def test_single_word_over_limit_is_hard_cut() -> None:
    out = chunk("a" * 70 + " end", max_chars=30)
    assert out == ["a" * 30, "a" * 30, "a" * 10 + " end"]
    # A long URL is cut after punctuation rather than mid-letters when it can be.
    url = "https://example.com/" + "x" * 40
    out = chunk(url, max_chars=30)
    assert out[0] == "https://example.com/"
    assert "".join(out) == url


def test_hard_cut_never_separates_a_vowel_sign() -> None:
    word = "हिंदी" * 10
    out = chunk(word, max_chars=7)
    assert "".join(out) == word
    for c in out:
        assert len(c) <= 7
        assert unicodedata.category(c[0])[0] != "M"


def test_token_limit() -> None:
    text = "one, two, three, four, five, six, seven, eight"
    out = chunk(text, max_chars=1000, max_tokens=6)
    assert all(count_tokens(c) <= 6 for c in out)
    assert out[0] == "one, two, three,"
    boundaries(out, text)


def test_flush_respects_the_limit() -> None:
    c = TextChunker(max_chars=10)
    assert c.push("aaaa bbbb") == []
    assert c.flush() == ["aaaa bbbb"]
    # 11 chars: one past the limit, which push leaves to flush (or to the next push).
    assert c.push("aaaa bbbb c") == []
    assert c.flush() == ["aaaa bbbb", "c"]
    assert c.push("aaaa bbbb cc") == ["aaaa bbbb"]
    assert c.flush() == ["cc"]


def test_min_chars_joins_short_sentences() -> None:
    assert chunk("Hi. How are you? Ok.", max_chars=100, min_chars=10) == [
        "Hi. How are you?",
        "Ok.",
    ]


def test_clear_and_whitespace_normalisation() -> None:
    c = TextChunker(max_chars=100)
    c.push("  Hello \t  there")
    assert c.buffered == "Hello there"
    c.clear()
    assert c.buffered == ""
    assert c.push("   ") == []
    assert c.push("Next.  ") == []
    assert c.push(" \n Word") == ["Next."]
    assert c.flush() == ["Word"]


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        TextChunker(0)
    with pytest.raises(ValueError):
        TextChunker(10, 0)
    with pytest.raises(ValueError):
        TextChunker(10, min_chars=0)


# --- properties ----------------------------------------------------------------------------------

# Items that must never contain a chunk boundary (each is followed by a plain word, so there is
# always an unprotected place to cut within the limits used below).
PROTECTED = [
    "3.14", "1,000", "$5.99", "2.0.1", "Dr. Smith", "Mr. Jones", "e.g. apples", "i.e. this",
    "U.S. Army", "No. 5", "p.m. today",
]  # fmt: skip
# Items that are never a sentence end; a cut there is only allowed when the limit forces it
# (the space is an ordinary place to cut an over-long sentence at).
NOT_SENTENCE_END = ["etc. and", "Well... maybe"]
WORDS = [
    "hello", "World", "the", "a", "cat,", "dog;", "end.", "Why?", "wow!", "so:", "list —",
    "(aside)", "\"quoted.\"", "नमस्ते", "भारत।", "हिंदी", "你好。", "https://example.com/a.b?c=1",
    "john.doe@example.com", "42", "Done.", "really?!", "x—y",
]  # fmt: skip
SPACES = [" ", " ", " ", "  ", "\n", "\t", " \n "]


@st.composite
def texts(draw: st.DrawFn) -> str:
    parts: list[str] = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.integers(0, 3)) == 0:
            parts.append(draw(st.sampled_from(PROTECTED + NOT_SENTENCE_END)) + " tail")
        else:
            parts.append(draw(st.sampled_from(WORDS)))
        parts.append(draw(st.sampled_from(SPACES)))
    return draw(st.sampled_from(["", " "])) + "".join(parts)


@st.composite
def split(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=max(1, len(text) // 2))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    text=texts(),
    max_chars=st.integers(40, 200),
    max_tokens=st.one_of(st.none(), st.integers(16, 60)),
    min_chars=st.integers(1, 20),
)
def test_chunking_properties(
    data: st.DataObject, text: str, max_chars: int, max_tokens: int | None, min_chars: int
) -> None:
    pieces = data.draw(split(text))
    kw = {"max_chars": max_chars, "max_tokens": max_tokens, "min_chars": min_chars}
    out = chunk(text, pieces, **kw)
    ends = boundaries(out, text)
    for c in out:
        assert len(c) <= max_chars
        assert max_tokens is None or count_tokens(c) <= max_tokens
    norm = normalize_whitespace(text)
    for item in PROTECTED:
        for m in re.finditer(re.escape(item), norm):
            inside = [e for e in ends if m.start() < e < m.end()]
            assert not inside, (item, out)
    for item in NOT_SENTENCE_END:
        for m in re.finditer(re.escape(item), norm):
            for i, e in enumerate(ends):
                if m.start() < e < m.end():
                    longer = out[i] + " " + out[i + 1].split(" ")[0]
                    assert len(longer) > max_chars or (
                        max_tokens is not None and count_tokens(longer) > max_tokens
                    ), (item, out)
    # Chunking does not depend on how the text was split into tokens.
    assert out == chunk(text, [text], **kw)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    text=st.text(alphabet=st.sampled_from("ab Z1.,;!?…—'\")\n\t。।ि@/:$"), max_size=120),
    max_chars=st.integers(1, 30),
    max_tokens=st.one_of(st.none(), st.integers(1, 12)),
    min_chars=st.integers(1, 5),
)
def test_arbitrary_text_never_breaks_the_invariants(
    data: st.DataObject, text: str, max_chars: int, max_tokens: int | None, min_chars: int
) -> None:
    pieces = data.draw(split(text))
    kw = {"max_chars": max_chars, "max_tokens": max_tokens, "min_chars": min_chars}
    out = chunk(text, pieces, **kw)
    boundaries(out, text)
    for c in out:
        assert len(c) <= max_chars
        assert max_tokens is None or count_tokens(c) <= max_tokens
    assert out == chunk(text, [text], **kw)
