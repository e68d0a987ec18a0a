"""Speech recognition for WER: a recogniser interface, pocketsphinx with a domain LM (and an adapted
acoustic model), Whisper as a pluggable backend, and WER through jiwer with one normalisation.

No recogniser here is trained from scratch by the project. The default is pocketsphinx, whose wheel
ships CMU's en-us acoustic model and dictionary; two things make it usable on this corpus:

- a *domain* language model: a trigram built here, in Python, from the corpus's own sentences
  (interpolated Witten-Bell smoothing written as a back-off ARPA file), with a pronunciation
  dictionary restricted to the corpus's words (cmudict entries; words cmudict lacks get a
  pronunciation from eSpeak's IPA mapped to ARPAbet, and are listed). Which sentences feed the LM
  is an open choice, made explicit by `judges.asr_lm_splits`: by default train and val only, so the
  test sentences are *not* memorised; the vocabulary is every corpus word (a closed-vocabulary
  task, as a domain recogniser would be), so test-only words are reachable through the unigram floor;
- MAP adaptation of the acoustic model's means to the corpus's voices on train-split recordings
  (`rlhf_tts.eval.asr_adapt`, `judges.asr_adapt_utterances`; 0 keeps the stock model). Measured on
  the tiny corpus's test recordings whose audio carries the whole text (intact word marks): 45.8 % WER
  with the stock model, 9.4 % adapted (`python -m rlhf_tts.run stages=[judges]`, with and without
  `judges.asr_adapt_utterances=0`; see the README).

Both are built once per config and cached under `<cache_dir>/judges/asr/<key>/` (`build_domain_asr`).

Whisper plugs into the same `Recognizer` protocol when the user has it installed with local weights
(`transformers` with a local model folder, or `openai-whisper` with a local `.pt` file); nothing is
downloaded.

WER is computed with `jiwer` after one normalisation, `spoken_words`, applied to reference and
hypothesis alike: NFKC, lower case, digits read out as eSpeak's en-us voice reads them
("291" → "two hundred ninety one", "1985" → "nineteen hundred eighty five"), punctuation removed
except word-internal apostrophes. Corpus WER is total edits over total reference words.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from rlhf_tts.errors import InputError

ASR_SAMPLE_RATE = 16000

# ----------------------------------------------------------------------------- text normalisation

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> list[str]:
    """A non-negative integer read out the way eSpeak NG's en-us voice reads digits.

    Measured on the front end's phonemes: no "and" ("two hundred ninety one"), 1100-1999 read in
    hundreds ("nineteen hundred eighty five"), other thousands as thousands ("two thousand ten").
    """
    if n < 0:
        return ["minus", *number_words(-n)]
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [_ONES[n // 100], "hundred"] + (number_words(n % 100) if n % 100 else [])
    if 1100 <= n < 2000 and (n // 100) % 10:
        return number_words(n // 100) + ["hundred"] + (number_words(n % 100) if n % 100 else [])
    if n < 1_000_000:
        return number_words(n // 1000) + ["thousand"] + (number_words(n % 1000) if n % 1000 else [])
    if n < 1_000_000_000:
        return number_words(n // 1_000_000) + ["million"] + (number_words(n % 1_000_000) if n % 1_000_000 else [])
    return [" ".join(number_words(int(d))) for d in str(n)]  # digit by digit, as a last resort


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def spoken_words(text: str) -> list[str]:
    """The one normalisation applied to references and hypotheses before WER (see module doc)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'").replace("‘", "'")
    words: list[str] = []
    for token in _WORD.findall(text):
        if token.isdigit():
            words.extend(" ".join(number_words(int(token))).split())
        else:
            parts = re.split(r"(\d+)", token)  # "3rd"-like mixtures: read the digits, keep the letters
            for part in parts:
                if not part:
                    continue
                words.extend(" ".join(number_words(int(part))).split() if part.isdigit() else [part])
    return words


def normalize_transcript(text: str) -> str:
    return " ".join(spoken_words(text))


@dataclass(frozen=True)
class WordErrors:
    """Edit operations of one hypothesis against its reference (after `spoken_words`)."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / max(self.reference_words, 1)


def word_errors(reference: str, hypothesis: str) -> WordErrors:
    """Counts through jiwer, after the shared normalisation; an empty hypothesis is all deletions."""
    import jiwer

    ref, hyp = normalize_transcript(reference), normalize_transcript(hypothesis)
    if not ref:
        return WordErrors(0, 0, len(hyp.split()), 0)
    if not hyp:
        return WordErrors(0, len(ref.split()), 0, len(ref.split()))
    out = jiwer.process_words(ref, hyp)
    return WordErrors(out.substitutions, out.deletions, out.insertions, len(ref.split()))


def corpus_wer(errors: Sequence[WordErrors]) -> float:
    """Total edits over total reference words (not a mean of per-utterance rates)."""
    return sum(e.errors for e in errors) / max(sum(e.reference_words for e in errors), 1)


# ----------------------------------------------------------------------------- language model

BOS, EOS = "<s>", "</s>"


def build_arpa(sentences: Iterable[Sequence[str]], vocabulary: Iterable[str] = (), order: int = 3) -> str:
    """An interpolated Witten-Bell n-gram LM over word sequences, as back-off ARPA text.

    Witten-Bell: P(w|h) = (c(h,w) + T(h) P(w|h')) / (c(h) + T(h)), T(h) = distinct words seen after h;
    the unigram level interpolates with the uniform distribution over the vocabulary, so a word of
    `vocabulary` never seen in `sentences` keeps a small probability. Written in back-off form: every
    seen n-gram carries its interpolated probability and every history h the weight
    bow(h) = T(h) / (c(h) + T(h)), which reproduces the interpolated model exactly. Chosen over
    Kneser-Ney for being exact in this form with no discount estimation on a corpus this small.
    """
    if order < 1:
        raise ValueError(f"order: must be >= 1, got {order}")
    counts: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    vocab = {w for w in vocabulary}
    for words in sentences:
        padded = [BOS, *words, EOS]
        vocab.update(words)
        for n in range(1, order + 1):
            for i in range(1, len(padded)):  # predicted position i (never <s>)
                if i - n + 1 < 0:
                    continue
                counts[n][tuple(padded[i - n + 1 : i + 1])] += 1
    vocab.discard(BOS)
    vocab.add(EOS)
    words_sorted = sorted(vocab)

    # per-history totals and type counts, for each order
    context_total: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    context_types: list[dict[tuple[str, ...], int]] = [defaultdict(int) for _ in range(order + 1)]
    for n in range(1, order + 1):
        for gram, c in counts[n].items():
            context_total[n][gram[:-1]] += c
            context_types[n][gram[:-1]] += 1

    probs: list[dict[tuple[str, ...], float]] = [dict() for _ in range(order + 1)]
    total1, types1 = context_total[1][()], context_types[1][()]
    uniform = 1.0 / len(words_sorted)
    for w in words_sorted:
        c = counts[1].get((w,), 0)
        probs[1][(w,)] = (c + types1 * uniform) / (total1 + types1) if total1 else uniform

    def prob(gram: tuple[str, ...]) -> float:
        """Interpolated P(gram[-1] | gram[:-1]) at order len(gram)."""
        n = len(gram)
        if n == 1:
            return probs[1][gram]
        if gram in probs[n]:
            return probs[n][gram]
        history = gram[:-1]
        total = context_total[n].get(history, 0)
        lower = prob(gram[1:])
        if not total:
            return lower
        return context_types[n][history] / (total + context_types[n][history]) * lower

    for n in range(2, order + 1):
        for gram in sorted(counts[n]):
            history = gram[:-1]
            total, types = context_total[n][history], context_types[n][history]
            probs[n][gram] = (counts[n][gram] + types * prob(gram[1:])) / (total + types)

    def bow(history: tuple[str, ...]) -> float | None:
        n = len(history) + 1
        if n > order or history not in context_total[n]:
            return None
        total, types = context_total[n][history], context_types[n][history]
        return types / (total + types)

    lines = ["", "\\data\\"]
    grams_per_order = [len(words_sorted) + 1] + [len(probs[n]) for n in range(2, order + 1)]
    lines += [f"ngram {n}={count}" for n, count in enumerate(grams_per_order, start=1)]
    lines += ["", "\\1-grams:"]
    unigram_entries = [((BOS,), None)] + [((w,), probs[1][(w,)]) for w in words_sorted]
    for gram, p in unigram_entries:
        logp = -99.0 if p is None else math.log10(p)
        b = bow(gram)
        lines.append(f"{logp:.6f}\t{gram[0]}" + (f"\t{math.log10(b):.6f}" if b is not None else ""))
    for n in range(2, order + 1):
        lines += ["", f"\\{n}-grams:"]
        for gram in sorted(probs[n]):
            b = bow(gram) if n < order else None
            lines.append(f"{math.log10(probs[n][gram]):.6f}\t{' '.join(gram)}" + (f"\t{math.log10(b):.6f}" if b is not None else ""))
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


@dataclass
class ArpaModel:
    """A back-off ARPA model read back in, for checking what `build_arpa` wrote (tests, diagnostics)."""

    order: int
    logprob: dict[tuple[str, ...], float]
    backoff: dict[tuple[str, ...], float]

    @classmethod
    def parse(cls, text: str) -> "ArpaModel":
        logprob: dict[tuple[str, ...], float] = {}
        backoff: dict[tuple[str, ...], float] = {}
        order, section = 0, 0
        for line in text.splitlines():
            line = line.strip()
            found = re.fullmatch(r"\\(\d+)-grams:", line)
            if found:
                section = int(found.group(1))
                order = max(order, section)
                continue
            if not line or line.startswith("\\") or line.startswith("ngram ") or section == 0:
                continue
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            logprob[gram] = float(fields[0])
            if len(fields) > 2:
                backoff[gram] = float(fields[2])
        return cls(order, logprob, backoff)

    def log10_prob(self, word: str, history: Sequence[str]) -> float:
        history = tuple(history)[-(self.order - 1):] if self.order > 1 else ()
        penalty = 0.0
        while True:
            gram = (*history, word)
            if gram in self.logprob:
                return penalty + self.logprob[gram]
            if not history:
                return -math.inf
            penalty += self.backoff.get(history, 0.0)
            history = history[1:]


# ----------------------------------------------------------------------------- pronunciations

#: eSpeak NG IPA (en-us) → CMU ARPAbet, longest match first; a fallback for words cmudict lacks.
_IPA_TO_ARPABET = {
    "aɪə": ["AY", "ER"], "aɪ": ["AY"], "aʊ": ["AW"], "eɪ": ["EY"], "oʊ": ["OW"], "ɔɪ": ["OY"], "əʊ": ["OW"],
    "tʃ": ["CH"], "dʒ": ["JH"], "iː": ["IY"], "uː": ["UW"], "ɑː": ["AA"], "ɔː": ["AO"], "ɜː": ["ER"],
    "ɑːɹ": ["AA", "R"], "ɔːɹ": ["AO", "R"], "ɪɹ": ["IH", "R"], "ɛɹ": ["EH", "R"], "ʊɹ": ["UH", "R"],
    "ɚ": ["ER"], "ɝ": ["ER"], "ə": ["AH"], "ɐ": ["AH"], "ʌ": ["AH"], "ɪ": ["IH"], "ᵻ": ["IH"], "ɛ": ["EH"],
    "æ": ["AE"], "ʊ": ["UH"], "ɑ": ["AA"], "ɒ": ["AA"], "ɔ": ["AO"], "ɜ": ["ER"], "i": ["IY"], "u": ["UW"],
    "o": ["OW"], "e": ["EH"], "a": ["AA"], "ɾ": ["T"], "ɹ": ["R"], "r": ["R"], "ŋ": ["NG"], "θ": ["TH"],
    "ð": ["DH"], "ʃ": ["SH"], "ʒ": ["ZH"], "j": ["Y"], "w": ["W"], "h": ["HH"], "l": ["L"], "ɫ": ["L"],
    "n": ["N"], "m": ["M"], "b": ["B"], "d": ["D"], "f": ["F"], "g": ["G"], "ɡ": ["G"], "k": ["K"],
    "p": ["P"], "s": ["S"], "t": ["T"], "v": ["V"], "z": ["Z"], "x": ["K"], "ʔ": [],
}
_IPA_KEYS = sorted(_IPA_TO_ARPABET, key=len, reverse=True)


def ipa_to_arpabet(ipa: str) -> list[str]:
    """Greedy longest-match transliteration; stress and length marks not in a key are dropped."""
    ipa = ipa.replace("ˈ", "").replace("ˌ", "")
    out: list[str] = []
    i = 0
    while i < len(ipa):
        for key in _IPA_KEYS:
            if ipa.startswith(key, i):
                out.extend(_IPA_TO_ARPABET[key])
                i += len(key)
                break
        else:
            i += 1  # a mark with no ARPAbet counterpart (ː alone, syllabic marks)
    return out


def cmudict_path() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path()) / "en-us" / "cmudict-en-us.dict"


def build_dictionary(words: Iterable[str], cmudict: Path | None = None) -> tuple[list[str], list[str]]:
    """Dictionary lines for `words` (all pronunciation variants from cmudict) and the words given
    a pronunciation by the eSpeak → ARPAbet fallback instead."""
    wanted = set(words)
    entries: dict[str, list[str]] = defaultdict(list)
    with open(cmudict or cmudict_path(), encoding="utf-8") as handle:
        for line in handle:
            head, _, phones = line.strip().partition(" ")
            base = re.sub(r"\(\d+\)$", "", head)
            if base in wanted:
                entries[base].append(phones.split("#")[0].strip())
    fallback = []
    for word in sorted(wanted - set(entries)):
        from rlhf_tts.data.frontend import _word_phonemes

        phones = ipa_to_arpabet(_word_phonemes(word, "en-us"))
        if phones:
            entries[word].append(" ".join(phones))
            fallback.append(word)
    lines = []
    for word in sorted(entries):
        for i, phones in enumerate(dict.fromkeys(entries[word])):
            lines.append(f"{word if i == 0 else f'{word}({i + 1})'} {phones}")
    return lines, fallback


@dataclass(frozen=True)
class DomainLM:
    """The files pocketsphinx needs for one corpus: an ARPA LM and a pronunciation dictionary."""

    directory: Path

    @property
    def arpa(self) -> Path:
        return self.directory / "domain.arpa"

    @property
    def dictionary(self) -> Path:
        return self.directory / "domain.dict"

    @property
    def info(self) -> Path:
        return self.directory / "lm.json"

    def exists(self) -> bool:
        return self.arpa.is_file() and self.dictionary.is_file() and self.info.is_file()


def write_domain_lm(directory: Path, lm_texts: Sequence[str], vocabulary_texts: Sequence[str], order: int) -> DomainLM:
    """Build the LM from `lm_texts` over the vocabulary of `vocabulary_texts`; atomic (tmp + rename)."""
    import json
    import os
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocabulary = sorted({w for t in vocabulary_texts for w in spoken_words(t)})
    lines, fallback = build_dictionary(vocabulary)
    known = {re.sub(r"\(\d+\)$", "", line.split(" ", 1)[0]) for line in lines}
    unpronounceable = sorted(set(vocabulary) - known)
    sentences = [[w for w in spoken_words(t) if w in known] for t in lm_texts]
    (tmp / "domain.arpa").write_text(build_arpa(sentences, known, order))
    (tmp / "domain.dict").write_text("\n".join(lines) + "\n")
    (tmp / "lm.json").write_text(json.dumps({
        "order": order, "sentences": len(lm_texts), "vocabulary": len(vocabulary),
        "g2p_fallback": fallback, "unpronounceable": unpronounceable,
    }, indent=1))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return DomainLM(directory)


# ----------------------------------------------------------------------------- recognisers


@runtime_checkable
class Recognizer(Protocol):
    """Anything that turns mono float audio into text; WER is computed on its output."""

    name: str

    def transcribe(self, audios: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        ...


def to_rate(audio: np.ndarray, source: int, target: int) -> np.ndarray:
    if source == target:
        return np.asarray(audio, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    return AF.resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), source, target).numpy()


class PocketSphinxRecognizer:
    """CMU pocketsphinx with the domain LM and the en-us acoustic model (or its adapted copy).

    Each clip is resampled to 16 kHz, peak-normalised to 0.5 and laid over seeded white noise at
    `noise_floor_db` dBFS: the recogniser's log-spectral features break down on digital silence,
    which eSpeak and vocoders emit between words. Features are computed here
    (`rlhf_tts.eval.asr_adapt.sphinx_cepstra`, the Sphinx front end) and fed with `process_cep`, so
    an adapted model hears exactly the features it was adapted on. Cepstral mean normalisation is per
    utterance (`cmn=batch`, what the model's feat.params ask for) rather than the decoder's live
    estimate, whose start-up value is far off on clips of a few seconds.
    """

    name = "pocketsphinx"

    def __init__(self, lm: DomainLM, lm_weight: float = 10.0, noise_floor_db: float = -55.0,
                 acoustic_model: Path | None = None) -> None:
        from pocketsphinx import Decoder

        if not lm.exists():
            raise InputError(f"no domain LM in {lm.directory}: run the judges stage first")
        self.noise_floor_db = noise_floor_db
        self.acoustic_model = Path(acoustic_model) if acoustic_model is not None else default_acoustic_model()
        self.decoder = Decoder(hmm=str(self.acoustic_model), lm=str(lm.arpa), dict=str(lm.dictionary), lw=lm_weight,
                               cmn="batch", loglevel="FATAL")

    def prepare(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """The 16 kHz signal the decoder hears (normalised, over the seeded noise floor), float32."""
        return prepare_for_asr(audio, sample_rate, self.noise_floor_db)

    def transcribe(self, audios: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        from rlhf_tts.eval.asr_adapt import sphinx_cepstra

        out = []
        for audio in audios:
            cepstra = sphinx_cepstra(self.prepare(audio, sample_rate))
            if len(cepstra) < 5:  # under 50 ms: nothing to recognise
                out.append("")
                continue
            self.decoder.start_utt()
            self.decoder.process_cep(np.ascontiguousarray(cepstra, dtype=np.float32).tobytes(), full_utt=True)
            self.decoder.end_utt()
            hyp = self.decoder.hyp()
            out.append(hyp.hypstr if hyp is not None else "")
        return out


def default_acoustic_model() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path()) / "en-us" / "en-us"


def prepare_for_asr(audio: np.ndarray, sample_rate: int, noise_floor_db: float) -> np.ndarray:
    """Resample to 16 kHz, peak-normalise to 0.5, add white noise at `noise_floor_db` dBFS.

    The noise is seeded by the clip's length, so the same clip always gets the same floor.
    """
    pcm = to_rate(np.asarray(audio, dtype=np.float32), sample_rate, ASR_SAMPLE_RATE)
    if len(pcm) == 0:
        return pcm
    pcm = pcm / max(float(np.abs(pcm).max()), 1e-9) * 0.5
    noise = np.random.default_rng(len(pcm)).standard_normal(len(pcm)).astype(np.float32)
    return np.clip(pcm + noise * np.float32(10 ** (noise_floor_db / 20)), -1.0, 1.0).astype(np.float32)


class WhisperRecognizer:
    """Whisper from local weights: a `transformers` model folder, or an `openai-whisper` `.pt` file.

    Nothing is downloaded (`local_files_only`); without either package, or without the path, the
    error says what is missing.
    """

    name = "whisper"

    def __init__(self, model_path: str | Path, device: str = "cpu", batch_size: int = 8) -> None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise InputError(f"whisper model path {str(path)!r} does not exist")
        self.device, self.batch_size, self.backend = device, batch_size, ""
        try:
            import transformers  # noqa: F401
        except ImportError:
            transformers = None  # type: ignore[assignment]
        if transformers is not None and path.is_dir():
            from transformers import WhisperForConditionalGeneration, WhisperProcessor

            self.processor = WhisperProcessor.from_pretrained(str(path), local_files_only=True)
            self.model = WhisperForConditionalGeneration.from_pretrained(str(path), local_files_only=True).to(device).eval()
            self.backend = "transformers"
            return
        try:
            import whisper
        except ImportError:
            raise InputError(
                "the whisper recogniser needs `transformers` (with a local model folder) or `openai-whisper` "
                "(with a local .pt file) installed; neither is importable here") from None
        if not path.is_file():
            raise InputError(f"openai-whisper needs a local .pt checkpoint file, got folder {str(path)!r}")
        self.model = whisper.load_model(str(path), device=device)
        self.backend = "openai-whisper"

    def transcribe(self, audios: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        import torch

        clips = [to_rate(a, sample_rate, ASR_SAMPLE_RATE) for a in audios]
        if self.backend == "openai-whisper":
            return [self.model.transcribe(c, language="en", fp16=False)["text"].strip() for c in clips]
        out: list[str] = []
        for start in range(0, len(clips), self.batch_size):
            chunk = clips[start : start + self.batch_size]
            features = self.processor(chunk, sampling_rate=ASR_SAMPLE_RATE, return_tensors="pt").input_features
            with torch.no_grad():
                ids = self.model.generate(features.to(self.device), language="en", task="transcribe")
            out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out


def make_recognizer(backend: str, lm: DomainLM | None = None, whisper_model: str | None = None,
                    device: str = "cpu", lm_weight: float = 10.0, noise_floor_db: float = -55.0,
                    acoustic_model: Path | None = None) -> Recognizer:
    """`pocketsphinx` (needs the domain LM) or `whisper` (needs `judges.whisper_model`)."""
    if backend == "pocketsphinx":
        if lm is None:
            raise InputError("pocketsphinx needs a domain LM (run the judges stage)")
        return PocketSphinxRecognizer(lm, lm_weight, noise_floor_db, acoustic_model)
    if backend == "whisper":
        if not whisper_model:
            raise InputError("judges.asr_backend=whisper needs judges.whisper_model=PATH (local weights)")
        return WhisperRecognizer(whisper_model, device)
    raise InputError(f"unknown recogniser {backend!r} (pocketsphinx, whisper)")


# ----------------------------------------------------------------------------- the cached domain recogniser

#: Bump when the LM, the adaptation or the front end change for the same config.
ASR_VERSION = 1


@dataclass(frozen=True)
class DomainASR:
    """`<cache_dir>/judges/asr/<key>/`: the domain LM (`lm/`), the adapted model (`acoustic/`), `asr.json`."""

    directory: Path

    @property
    def lm(self) -> DomainLM:
        return DomainLM(self.directory / "lm")

    @property
    def acoustic(self) -> Path | None:
        path = self.directory / "acoustic"
        return path if (path / "means").is_file() else None

    @property
    def info(self) -> Path:
        return self.directory / "asr.json"

    def exists(self) -> bool:
        return self.info.is_file() and self.lm.exists()


def domain_asr_key(cfg, dataset_dir: Path) -> str:  # noqa: ANN001 - RunConfig
    from rlhf_tts.config import stable_hash

    jc = cfg.judges
    fields = {"order": jc.asr_lm_order, "splits": sorted(jc.asr_lm_splits), "adapt": jc.asr_adapt_utterances,
              "tau": jc.asr_adapt_tau, "iterations": jc.asr_adapt_iterations, "floor": jc.asr_noise_floor_db}
    return stable_hash(Path(dataset_dir).name, fields, cfg.seed, ASR_VERSION)


def domain_asr_location(cfg) -> DomainASR:  # noqa: ANN001 - RunConfig
    from rlhf_tts.data.pipeline import dataset_location

    dataset, _ = dataset_location(cfg)
    return DomainASR(Path(cfg.cache_dir) / "judges" / "asr" / domain_asr_key(cfg, dataset.directory))


def build_domain_asr(cfg, progress=None) -> DomainASR:  # noqa: ANN001 - RunConfig, ProgressFn
    """Build (or reuse) the domain LM and, when `judges.asr_adapt_utterances` > 0, the MAP-adapted
    acoustic model, from the train split only; atomic (built in a temporary folder, then renamed)."""
    import json
    import os
    import shutil
    import time

    from rlhf_tts.data.audio import AudioDefect, load_audio
    from rlhf_tts.data.manifest import corpus_root, read_manifest
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.asr_adapt import adapt
    from rlhf_tts.workers import resolve_workers

    location = domain_asr_location(cfg)
    if location.exists():
        return location
    dataset, _ = dataset_location(cfg)
    if not dataset.manifest_path.is_file():
        raise InputError(f"no dataset at {dataset.directory}: run the data stage with the same config first")
    started = time.monotonic()
    jc = cfg.judges
    table = read_manifest(dataset.manifest_path)
    root = corpus_root(table)
    rows = table.to_pylist()
    tmp = location.directory.with_name(location.directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm = write_domain_lm(tmp / "lm", [r["text"] for r in rows if r["split"] in jc.asr_lm_splits],
                         [r["text"] for r in rows], jc.asr_lm_order)
    info: dict = {"lm": json.loads(lm.info.read_text()), "lm_splits": list(jc.asr_lm_splits), "adaptation": None}
    if jc.asr_adapt_utterances:
        train = [r for r in rows if r["split"] == "train"]
        train = train[:: max(1, len(train) // jc.asr_adapt_utterances)][: jc.asr_adapt_utterances]
        clips = []
        for r in train:
            try:
                audio = load_audio(root / r["wav_path"], ASR_SAMPLE_RATE, 0.0).samples
            except (AudioDefect, OSError):
                continue
            clips.append((prepare_for_asr(audio, ASR_SAMPLE_RATE, jc.asr_noise_floor_db), normalize_transcript(r["text"])))
        info["adaptation"] = adapt(default_acoustic_model(), tmp / "acoustic", lm.dictionary, clips,
                                   jc.asr_adapt_tau, jc.asr_adapt_iterations, progress=progress,
                                   workers=resolve_workers(jc.workers, "cpu"))
    info["seconds"] = round(time.monotonic() - started, 1)
    (tmp / "asr.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(location.directory, ignore_errors=True)
    tmp.rename(location.directory)
    return DomainASR(location.directory)


def load_recognizer(cfg, progress=None, build: bool = True) -> Recognizer:  # noqa: ANN001 - RunConfig, ProgressFn
    """The configured recogniser; pocketsphinx's domain files are built on first use when `build`."""
    jc = cfg.judges
    if jc.asr_backend == "whisper":
        return make_recognizer("whisper", whisper_model=jc.whisper_model, device=jc.device)
    asr = build_domain_asr(cfg, progress) if build else domain_asr_location(cfg)
    if not asr.exists():
        raise InputError(f"no domain recogniser at {asr.directory}: run the judges stage first")
    return make_recognizer("pocketsphinx", asr.lm, lm_weight=jc.asr_lm_weight, noise_floor_db=jc.asr_noise_floor_db,
                           acoustic_model=asr.acoustic)
