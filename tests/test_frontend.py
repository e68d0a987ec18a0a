import pytest

from rlhf_tts.data.frontend import PAD, SPACE, SYMBOLS, UNK, FrontendError, SymbolTable, normalize_text, phonemize


def test_words_spans_cover_only_their_phonemes():
    out = phonemize("Hello, world! The cats don't jump.")
    assert out.words == ("Hello", "world", "The", "cats", "don't", "jump")
    previous_end = 0
    for (start, end) in out.word_spans:
        assert previous_end <= start < end <= len(out.tokens)
        assert SPACE not in out.tokens[start:end] and "," not in out.tokens[start:end]
        previous_end = end
    # Punctuation is kept as its own token, between words.
    assert "," in out.tokens and out.tokens[-1] == "."
    assert "".join(out.tokens[slice(*out.word_spans[0])]) == "həlˈoʊ"


def test_numbers_are_read_as_one_word():
    out = phonemize("I have 42 cats.")
    assert out.words == ("I", "have", "42", "cats")
    forty_two = "".join(out.tokens[slice(*out.word_spans[2])])
    assert forty_two.startswith("fˈɔːɹ") and "tˈuː" in forty_two  # "forty-two"
    assert len(forty_two) > len("fˈɔːɹ")


def test_typography_and_unknown_characters():
    text, dropped = normalize_text("“Quick” — café 🎉  done…")
    assert text == '"Quick" - café done...'  # NFKC spells the ellipsis out
    assert dropped == ("🎉",)
    out = phonemize("café 🎉 ok")
    assert out.words == ("café", "ok") and out.dropped == ("🎉",)


@pytest.mark.parametrize("text", ["", "   ", "!!! ...", "🎉🎉"])
def test_unreadable_text_raises(text):
    with pytest.raises(FrontendError):
        phonemize(text)


def test_symbol_table_is_stable_and_round_trips(tmp_path):
    table = SymbolTable()
    # Ids of the first symbols are part of every saved model: they must never move.
    assert SYMBOLS[:3] == (PAD, UNK, SPACE)
    assert table.ids(["a", "b", "ə"]) == [SYMBOLS.index("a"), SYMBOLS.index("b"), SYMBOLS.index("ə")]
    assert table.ids(["\u4e2d"]) == [1]  # unknown → <unk>
    table.save(tmp_path / "symbols.json")
    loaded = SymbolTable.load(tmp_path / "symbols.json")
    assert loaded.symbols == table.symbols and loaded.version == table.version
    assert len(set(SYMBOLS)) == len(SYMBOLS)


def test_every_phoneme_of_real_sentences_is_in_the_table():
    from rlhf_tts.data.sentences import generate_sentences

    table = SymbolTable()
    for sentence in generate_sentences(300, seed=1):
        assert 1 not in table.ids(list(phonemize(sentence).tokens)), sentence
