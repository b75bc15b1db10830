"""The ASCII fast paths equal the general paths character for character: `normalize_text` (exact dedup hashes
it) and `match_tokens` (decontamination hashes its tokens)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from operators.text.normalize import match_tokens, match_tokens_general, normalize_text, normalize_text_general

ASCII = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=300)


@settings(max_examples=2000, deadline=None)
@given(ASCII)
def test_the_ascii_path_equals_the_general_path(text: str) -> None:
    assert text.isascii()
    assert normalize_text(text) == normalize_text_general(text)
    assert match_tokens(text) == match_tokens_general(text)


def test_every_ascii_character_and_the_general_path_for_the_rest() -> None:
    every = "".join(chr(c) for c in range(128))
    assert normalize_text(every) == normalize_text_general(every) == \
        "0123456789 abcdefghijklmnopqrstuvwxyz _ abcdefghijklmnopqrstuvwxyz"
    assert normalize_text("Hello,\u00a0 World!\x1f\tDon't") == "hello world don t"
    assert normalize_text("Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ") == "full width abc"  # NFKC, on the general path


def test_match_tokens_of_every_ascii_character() -> None:
    every = "".join(chr(c) for c in range(128))
    assert match_tokens(every) == match_tokens_general(every) == ["0123456789", "abcdefghijklmnopqrstuvwxyz",
                                                                  "abcdefghijklmnopqrstuvwxyz"]
    assert match_tokens("Don't `SHOUT`_now\x1c42") == ["dont", "shout", "now", "42"]
