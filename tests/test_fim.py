import random

import pytest

from nanoseek.fim import SENTINELS, encode_document, infill_prompt, sentinel_ids
from nanoseek.tokenizer import Tokenizer

DOC = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


def fim_tokenizer() -> Tokenizer:
    tok = Tokenizer.char()
    tok.tok.add_special_tokens(list(SENTINELS))
    return tok


def split_at(ids: list[int], marks: tuple[int, ...]) -> list[list[int]]:
    pieces, current = [], []
    for i in ids:
        if i in marks:
            pieces.append(current)
            current = []
        else:
            current.append(i)
    return pieces + [current]


@pytest.mark.parametrize("mode", ["psm", "spm"])
def test_fim_formats_round_trip(mode: str) -> None:
    tok = fim_tokenizer()
    begin, hole, end = sentinel_ids(tok)
    middles = set()
    for seed in range(20):
        ids = encode_document(DOC, tok, random.Random(seed), 1.0, mode)
        replay = random.Random(seed)
        replay.random()
        start, stop = sorted(replay.randint(0, len(DOC)) for _ in range(2))
        first, second, third, after_end = split_at(ids, (begin, hole, end))
        assert first == []
        if mode == "psm":  # begin prefix hole suffix end middle
            prefix, suffix, middle = tok.decode(second), tok.decode(third), tok.decode(after_end)
        else:  # begin hole suffix end prefix middle
            assert second == []
            suffix, prefix_and_middle = tok.decode(third), tok.decode(after_end)
            prefix, middle = prefix_and_middle[:start], prefix_and_middle[start:]
        assert (prefix, middle, suffix) == (DOC[:start], DOC[start:stop], DOC[stop:])
        assert ids == infill_prompt(prefix, suffix, tok, mode) + tok.encode(middle)
        middles.add(middle)
    assert len(middles) > 5  # the split points vary with the rng


def test_rate_zero_is_plain_and_pieces_never_become_sentinels() -> None:
    tok = fim_tokenizer()
    assert encode_document(DOC, tok, random.Random(0), 0.0, "psm") == tok.encode(DOC)
    text = f"x = '{SENTINELS[1]}'\n"
    for seed in range(10):
        ids = encode_document(text, tok, random.Random(seed), 1.0, "psm")
        assert ids.count(sentinel_ids(tok)[1]) == 1


def test_missing_sentinels_and_bad_mode() -> None:
    with pytest.raises(ValueError, match="nanoseek prepare, which adds the FIM sentinels"):
        encode_document(DOC, Tokenizer.char(), random.Random(0), 1.0, "psm")
    with pytest.raises(ValueError, match="FIM mode"):
        infill_prompt("a", "b", fim_tokenizer(), "pms")
