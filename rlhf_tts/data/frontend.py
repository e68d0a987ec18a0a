"""Text front end: normalisation, words, eSpeak NG IPA phonemes with word boundaries, symbol table.

Words are phonemised one at a time so every phoneme belongs to exactly one word: HPRO's word-level
reward and the word spans in the manifest depend on that, and eSpeak's whole-sentence output merges
words ("in the" → "ɪnðə"). The cost, lost cross-word coarticulation, does not matter for a mel TTS.
Numbers are read by eSpeak ("42" → "forty-two"), so they stay one orthographic word.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from rlhf_tts.data.espeak import Espeak

PAD, UNK, SPACE = "<pad>", "<unk>", " "
PUNCTUATION = ",.!?;:-\"()'"
_IPA = (
    "ɑɐɒæɓʙβɔɕçɗɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢ"
    "ǀǁǂǃˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘ᵻ\u0329\u0303"
)
#: Version 1 of the symbol table. Append only: ids of existing symbols never change, so a saved
#: model keeps reading text after the table grows.
SYMBOLS: tuple[str, ...] = (PAD, UNK, SPACE, *PUNCTUATION, *"abcdefghijklmnopqrstuvwxyz", *_IPA)
SYMBOL_TABLE_VERSION = 1

_QUOTES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "."})
_TOKEN = re.compile(r"[^\W_]+(?:['.][^\W_]+)*|[,.!?;:\"()-]")


class FrontendError(ValueError):
    """Text the front end cannot read (empty, or nothing pronounceable)."""


@dataclass(frozen=True)
class SymbolTable:
    symbols: tuple[str, ...] = SYMBOLS
    version: int = SYMBOL_TABLE_VERSION
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({s: i for i, s in enumerate(self.symbols)})

    def __len__(self) -> int:
        return len(self.symbols)

    def ids(self, tokens: list[str]) -> list[int]:
        unk = self._index[UNK]
        return [self._index.get(t, unk) for t in tokens]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"version": self.version, "symbols": list(self.symbols)}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "SymbolTable":
        data = json.loads(Path(path).read_text())
        return cls(symbols=tuple(data["symbols"]), version=int(data["version"]))


@dataclass(frozen=True)
class PhonemizedText:
    """Phoneme tokens of a text; `word_spans[i]` is the [start, end) token range of `words[i]`."""

    text: str
    tokens: tuple[str, ...]
    words: tuple[str, ...]
    word_spans: tuple[tuple[int, int], ...]
    dropped: tuple[str, ...] = ()  # characters removed during normalisation


def normalize_text(text: str) -> tuple[str, tuple[str, ...]]:
    """NFKC, typographic quotes/dashes to ASCII, collapse spaces; drop unreadable characters."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    kept, dropped = [], []
    for ch in text:
        if ch.isalnum() or ch.isspace() or ch in PUNCTUATION:
            kept.append(" " if ch.isspace() else ch)
        else:
            dropped.append(ch)
    return re.sub(r" +", " ", "".join(kept)).strip(), tuple(dropped)


@lru_cache(maxsize=65536)
def _word_phonemes(word: str, voice: str) -> str:
    return Espeak.instance().phonemize(word, voice).replace(" ", "").replace("-", "")


def phonemize(text: str, voice: str = "en-us") -> PhonemizedText:
    """Text → phoneme tokens with word spans; raises FrontendError when nothing is pronounceable."""
    if not text or not text.strip():
        raise FrontendError("empty text")
    normalized, dropped = normalize_text(text)
    tokens: list[str] = []
    words: list[str] = []
    spans: list[tuple[int, int]] = []
    for piece in _TOKEN.findall(normalized):
        if len(piece) == 1 and piece in PUNCTUATION:
            if tokens and tokens[-1] == SPACE:
                tokens.pop()
            tokens.extend([piece, SPACE])
            continue
        phones = _word_phonemes(piece.lower(), voice)
        if not phones:
            dropped = dropped + (piece,)
            continue
        start = len(tokens)
        tokens.extend(phones)
        spans.append((start, len(tokens)))
        words.append(piece)
        tokens.append(SPACE)
    while tokens and tokens[-1] == SPACE:
        tokens.pop()
    if not words:
        raise FrontendError(f"no pronounceable words in {text!r}")
    return PhonemizedText(normalized, tuple(tokens), tuple(words), tuple(spans), dropped)
