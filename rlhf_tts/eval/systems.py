"""The systems a report compares: each turns held-out utterances into audio at the feature rate.

- `recordings`: the corpus audio itself, the judges' own ceiling (it is what the emotion judge and
  the recogniser's domain were fitted to).
- `ground-truth resynthesis`: the reference log-mel through the evaluation vocoder: the upper bound
  of every generated system, since a model's best possible mel still reaches the judges through
  that vocoder (METHOD §5).
- a model (`ModelSystem`): a base-model folder (`model.json` + `final/`, what pretraining and
  alignment both write) synthesising each utterance's text, speaker and emotion from the manifest's
  phonemes, then the same vocoder.
- a folder of `<utt_id>.wav` files (`WavFolderSystem`) from any other TTS; missing or unreadable
  files are listed with their reason and the utterance is left out of that system's row.
- `DegradedSystem`: ground-truth resynthesis with planted faults (the same speaker saying the same
  sentence in a *different* emotion, plus white noise at a set SNR), a system the metrics must rank
  below the others: a sanity check of the report itself.

Every system yields `SystemOutput`s: the audio, the mel the vocoder heard (for plots), and word
spans in the audio's frames when the system knows them (a model's own durations, the reference's
marks); otherwise the report maps the reference's spans through the DTW path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from rlhf_tts.config import FeatureConfig, RunConfig
from rlhf_tts.errors import InputError
from rlhf_tts.eval.corpus import EvalUtterance

ProgressFn = Callable[..., None]

RESYNTHESIS = "ground-truth resynthesis"
SYNTHESIS_VERSION = 2  # 2: per-utterance sampling noise (`utterance_generator`)
#: `evaluate.*` fields that change what a model system synthesises (and nothing else's row): they key model
#: rows only, so that e.g. another temperature does not recompute the recordings' and resynthesis rows.
MODEL_SAMPLER_FIELDS = ("sampler_steps", "temperature", "guidance", "stochastic", "durations", "synthesis_batch",
                        "seed", "output_level")
RECORDINGS = "recordings"


@dataclass
class SystemOutput:
    utt_id: str
    audio: np.ndarray  # mono float32 at features.sample_rate
    mel: np.ndarray | None = None  # (n_mels, T) the vocoder's input, when there was one
    word_frame_spans: list[tuple[int, int]] | None = None  # [start, end) frames of this audio per word


@dataclass
class SystemRun:
    """What a system produced for the report: outputs by utterance id and what it could not produce."""

    outputs: dict[str, SystemOutput]
    missing: dict[str, str] = field(default_factory=dict)  # utt_id → reason


class System(Protocol):
    name: str
    kind: str
    source: str

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        ...


def _report(progress: ProgressFn | None, label: str, done: int, total: int) -> None:
    if progress is not None:
        progress(label, done, total)


def _length_order(lengths: Sequence[int], batch: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def vocode(mels: Sequence[np.ndarray], vocoder, features: FeatureConfig, batch_size: int = 16,  # noqa: ANN001
           progress: ProgressFn | None = None, label: str = "vocode") -> list[np.ndarray]:
    """Length-bucketed batched vocoding; each clip is cut to its own frames × hop samples."""
    out: list[np.ndarray | None] = [None] * len(mels)
    done = 0
    for index in _length_order([m.shape[-1] for m in mels], batch_size):
        n = max(mels[i].shape[-1] for i in index)
        batch = torch.full((len(index), features.n_mels, n), float(np.log(1e-5)))
        for row, i in enumerate(index):
            batch[row, :, : mels[i].shape[-1]] = torch.from_numpy(np.asarray(mels[i], dtype=np.float32))
        with torch.no_grad():
            audio = vocoder(batch).cpu().numpy()
        for row, i in enumerate(index):
            out[i] = np.ascontiguousarray(audio[row, : mels[i].shape[-1] * features.hop_length], dtype=np.float32)
        done += len(index)
        _report(progress, label, done, len(mels))
    return out  # type: ignore[return-value]


def synthesis_batch(configured: int, device: torch.device) -> int:
    """`evaluate.synthesis_batch`, with 0 resolved: 1 on CPU (a padded batch costs more per utterance
    there than one unpadded utterance at a time), 16 on an accelerator."""
    return configured or (1 if torch.device(device).type == "cpu" else 16)


def vocoder_key(vocoder) -> str | None:  # noqa: ANN001
    """What makes a vocoder's audio what it is, or None when unknown (then nothing it voices is cached)."""
    from rlhf_tts.models.vocoder import GriffinLimVocoder

    if isinstance(vocoder, GriffinLimVocoder):
        return f"griffin_lim n_iter={vocoder.n_iter} momentum={vocoder.momentum}"
    checkpoint = getattr(vocoder, "checkpoint", None)
    if checkpoint is not None:
        from rlhf_tts.eval.system_cache import file_identity

        identity = file_identity(Path(checkpoint))
        return None if identity is None else f"{type(vocoder).__name__} {identity}"
    return None


def load_recording(utt: EvalUtterance, sample_rate: int) -> np.ndarray:
    from rlhf_tts.data.audio import load_audio

    return load_audio(utt.wav_path, sample_rate, silence_peak=0.0).samples


class RecordingsSystem:
    """The corpus recordings as they are."""

    kind = "recordings"

    def __init__(self, features: FeatureConfig, name: str = RECORDINGS) -> None:
        self.name, self.features, self.source = name, features, "corpus audio"

    def cache_key(self) -> str:
        return "recordings"  # the corpus is in the cache context

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        outputs = {}
        for i, utt in enumerate(utterances):
            outputs[utt.utt_id] = SystemOutput(utt.utt_id, load_recording(utt, self.features.sample_rate), utt.mel,
                                               utt.word_frame_spans)
            _report(progress, f"{self.name}: load", i + 1, len(utterances))
        return SystemRun(outputs)


class ResynthesisSystem:
    """Ground-truth mel → the evaluation vocoder (the upper bound of every generated system)."""

    kind = "resynthesis"

    def __init__(self, features: FeatureConfig, vocoder, batch_size: int = 16, name: str = RESYNTHESIS) -> None:  # noqa: ANN001
        self.name, self.features, self.vocoder, self.batch_size = name, features, vocoder, batch_size
        self.source = f"reference mel → {type(vocoder).__name__}"

    def cache_key(self) -> str | None:
        vocoder = vocoder_key(self.vocoder)
        return None if vocoder is None else f"resynthesis {vocoder} {self.batch_size}"

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        mels = [u.mel for u in utterances]
        audio = vocode(mels, self.vocoder, self.features, self.batch_size, progress, f"{self.name}: vocode")
        return SystemRun({u.utt_id: SystemOutput(u.utt_id, a, u.mel, u.word_frame_spans)
                          for u, a in zip(utterances, audio)})


class DegradedSystem:
    """Ground-truth resynthesis with planted faults: wrong emotion and additive white noise.

    `wrong_emotion` replaces each utterance by the recording of the same speaker and text in the
    next emotion (cyclically, among those in `pool`), which keeps text and voice and changes only
    the emotion; `snr_db` adds seeded white noise at that signal-to-noise ratio (None: no noise).
    """

    kind = "degraded"

    def __init__(self, features: FeatureConfig, vocoder, pool: Sequence[EvalUtterance], wrong_emotion: bool = True,  # noqa: ANN001
                 snr_db: float | None = 10.0, seed: int = 0, batch_size: int = 16, name: str = "degraded") -> None:
        self.name, self.features, self.vocoder = name, features, vocoder
        self.wrong_emotion, self.snr_db, self.seed, self.batch_size = wrong_emotion, snr_db, seed, batch_size
        self.by_text: dict[tuple[str, str], dict[str, EvalUtterance]] = {}
        for utt in pool:
            self.by_text.setdefault((utt.speaker, utt.text), {})[utt.emotion] = utt
        faults = (["wrong emotion"] if wrong_emotion else []) + ([f"noise {snr_db:g} dB SNR"] if snr_db is not None else [])
        self.source = f"ground-truth resynthesis with {', '.join(faults) or 'no faults'}"
        self.pool_ids = sorted(u.utt_id for u in pool)

    def cache_key(self) -> str | None:
        vocoder = vocoder_key(self.vocoder)
        return None if vocoder is None else str(("degraded", vocoder, self.wrong_emotion, self.snr_db, self.seed,
                                                  self.batch_size, self.pool_ids))

    def swap(self, utt: EvalUtterance) -> EvalUtterance:
        from rlhf_tts.data.emotions import EMOTIONS

        if not self.wrong_emotion:
            return utt
        variants = self.by_text.get((utt.speaker, utt.text), {})
        order = [e for e in EMOTIONS if e in variants]
        if len(order) < 2:
            return utt
        return variants[order[(order.index(utt.emotion) + 1) % len(order)]] if utt.emotion in order else utt

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        sources = [self.swap(u) for u in utterances]
        audio = vocode([s.mel for s in sources], self.vocoder, self.features, self.batch_size, progress,
                       f"{self.name}: vocode")
        rng = np.random.default_rng(self.seed)
        outputs = {}
        for utt, src, clip in zip(utterances, sources, audio):
            if self.snr_db is not None:
                power = float(np.mean(clip.astype(np.float64) ** 2)) + 1e-12
                clip = clip + rng.standard_normal(len(clip)).astype(np.float32) * np.sqrt(power / 10 ** (self.snr_db / 10))
                clip = (clip / max(1.0, float(np.abs(clip).max()))).astype(np.float32)
            # mel None: the audio (noise included) is what the plots should show, not the clean source mel
            outputs[utt.utt_id] = SystemOutput(utt.utt_id, clip, None if self.snr_db is not None else src.mel,
                                               src.word_frame_spans)
        return SystemRun(outputs)


class WavFolderSystem:
    """`<folder>/<utt_id>.wav` from any synthesiser; resampled to the feature rate and downmixed."""

    kind = "wavs"

    def __init__(self, name: str, folder: str | Path, features: FeatureConfig) -> None:
        self.name, self.folder, self.features = name, Path(folder).expanduser(), features
        self.source = str(self.folder)
        if not self.folder.is_dir():
            raise InputError(f"system {name!r}: {str(self.folder)!r} is not a folder")

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        from rlhf_tts.data.audio import AudioDefect, load_audio

        outputs, missing = {}, {}
        for i, utt in enumerate(utterances):
            path = self.folder / f"{utt.utt_id}.wav"
            if not path.is_file():
                missing[utt.utt_id] = "no such file"
            else:
                try:
                    outputs[utt.utt_id] = SystemOutput(utt.utt_id, load_audio(path, self.features.sample_rate).samples)
                except (AudioDefect, OSError) as err:
                    missing[utt.utt_id] = str(err)
            _report(progress, f"{self.name}: load", i + 1, len(utterances))
        if not outputs:
            raise InputError(f"system {self.name!r}: none of the {len(utterances)} utterances has a readable "
                             f"<utt_id>.wav in {str(self.folder)!r} (e.g. {utterances[0].utt_id}.wav)")
        return SystemRun(outputs, missing)


def is_model_dir(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / "model.json").is_file() and (path / "final" / "state.json").is_file()


class ModelSystem:
    """A trained Grad-TTS (base or aligned) speaking each utterance's phonemes with its emotion and speaker.

    The utterances' own manifest phonemes are used (not re-phonemised text), so the model says
    exactly what the recording says. Durations are the model's own by default (real TTS);
    `durations="ground_truth"` uses MAS against the reference mel instead (frame-aligned output,
    which zeroes duration error by construction). Sampling is the deterministic ODE with a seeded
    initial state, so a report is reproducible.
    """

    kind = "model"

    def __init__(self, name: str, model_dir: str | Path, cfg: RunConfig, vocoder, device: str | torch.device = "cpu") -> None:  # noqa: ANN001
        from rlhf_tts.training.pretrain import BaseModel

        path = Path(model_dir).expanduser()
        if path.name == "final" and is_model_dir(path.parent):
            path = path.parent
        if not is_model_dir(path):
            raise InputError(f"system {name!r}: {str(path)!r} is not a model folder (model.json + final/state.json)")
        self.name, self.source, self.cfg, self.vocoder = name, str(path), cfg, vocoder
        self.model, self.vocab, model_cfg = BaseModel(path).load(device)
        if model_cfg.features != cfg.features:
            raise InputError(f"system {name!r}: the model's features differ from features.* of this config "
                             "(the judges and references use the config's)")
        self.device = torch.device(device)
        self.directory = path

    def cache_key(self) -> str | None:
        """The model's folder, its final weights (path, size, mtime), training state and sampler settings
        (`MODEL_SAMPLER_FIELDS`)."""
        from rlhf_tts.eval.system_cache import file_identity

        vocoder = vocoder_key(self.vocoder)
        weights = file_identity(self.directory / "final" / "tensors.safetensors")
        if vocoder is None or weights is None:
            return None
        state = (self.directory / "final" / "state.json").read_text()
        sampler = self.cfg.evaluate.model_dump(mode="json", include=set(MODEL_SAMPLER_FIELDS))
        return str(("model", str(self.directory.resolve()), weights, state, vocoder, str(self.device), sampler,
                    SYNTHESIS_VERSION))

    def run(self, utterances: Sequence[EvalUtterance], progress: ProgressFn | None = None) -> SystemRun:
        ev, features = self.cfg.evaluate, self.cfg.features
        mels, spans, missing = synthesize_utterances(self.model, self.vocab, utterances, ev, features, self.device,
                                                     progress, f"{self.name}: synthesise")
        usable = [u for u in utterances if u.utt_id in mels]
        audio = vocode([mels[u.utt_id] for u in usable], self.vocoder, features, ev.vocoder_batch, progress,
                       f"{self.name}: vocode")
        outputs = {u.utt_id: SystemOutput(u.utt_id, a, mels[u.utt_id], spans[u.utt_id]) for u, a in zip(usable, audio)}
        return SystemRun(outputs, missing)


def utterance_text_batch(items: Sequence[EvalUtterance], ids: Sequence[list[int]], vocab,  # noqa: ANN001
                         word_spans: bool = True):  # noqa: ANN201 - TextBatch
    """A padded `TextBatch` of utterances (their phoneme ids given), with their emotion and speaker."""
    from rlhf_tts.models.gradtts.model import TextBatch

    padded = torch.zeros(len(items), max(len(i) for i in ids), dtype=torch.long)
    for row, phonemes in enumerate(ids):
        padded[row, : len(phonemes)] = torch.tensor(phonemes)
    return TextBatch(padded, torch.tensor([len(i) for i in ids]),
                     torch.tensor([vocab.emotions.index(u.emotion) for u in items]),
                     torch.tensor([vocab.speakers.index(u.speaker) for u in items]),
                     [[tuple(s) for s in u.row["word_spans"]] for u in items] if word_spans else None)


def utterance_generator(seed: int, utt_id: str, device: str | torch.device = "cpu") -> torch.Generator:
    """The sampling noise of one utterance: a function of (seed, utterance), so a model speaks it the
    same way in any batch, any worker and any subset of the split."""
    from rlhf_tts.config import stable_hash

    return torch.Generator(device=device).manual_seed(int(stable_hash(seed, "utterance", utt_id, length=15), 16))


@torch.no_grad()
def _synthesize_batch(model, vocab, items: Sequence[EvalUtterance], ids: Sequence[list[int]], ev,  # noqa: ANN001
                      features: FeatureConfig, device: torch.device) -> list[tuple[str, np.ndarray, list | None]]:
    """(utt_id, mel, word frame spans) of one padded batch of utterances."""
    text = utterance_text_batch(items, ids, vocab).to(device)
    durations = None
    if ev.durations == "ground_truth":
        n = max(u.n_frames for u in items)
        mel = torch.zeros(len(items), features.n_mels, n, device=device)
        for row, u in enumerate(items):
            mel[row, :, : u.n_frames] = torch.from_numpy(u.mel)
        durations = model.ground_truth_durations(text, mel, torch.tensor([u.n_frames for u in items], device=device))
    prior = model.encode(text, durations=durations)
    generators = [utterance_generator(ev.seed, u.utt_id, device) for u in items]
    sampled = model.sample(prior, ev.sampler_steps, ev.temperature, ev.stochastic, ev.guidance, generators,
                           ev.output_level)
    return [(u.utt_id, sampled[row, :, : int(prior.lengths[row])].cpu().numpy(),
             prior.word_frame_spans[row] if prior.word_frame_spans else None) for row, u in enumerate(items)]


def _start_synthesis_worker(model, vocab, ev, features: FeatureConfig) -> None:  # noqa: ANN001
    from rlhf_tts.workers import worker_state

    worker_state().update(model=model.eval(), vocab=vocab, ev=ev, features=features)


def _synthesize_in_worker(items: Sequence[EvalUtterance],
                          ids: Sequence[list[int]]) -> list[tuple[str, np.ndarray, list | None]]:
    from rlhf_tts.workers import worker_state

    state = worker_state()
    return _synthesize_batch(state["model"], state["vocab"], items, ids, state["ev"], state["features"],
                             torch.device("cpu"))


def synthesize_utterances(model, vocab, utterances: Sequence[EvalUtterance], ev, features: FeatureConfig,  # noqa: ANN001
                          device: str | torch.device = "cpu", progress: ProgressFn | None = None,
                          label: str = "synthesise", workers: int | None = None,
                          ) -> tuple[dict[str, np.ndarray], dict[str, list | None], dict[str, str]]:
    """Mels (and word frame spans) of `model` for each utterance's phonemes, speaker and emotion.

    `ev` is an `EvaluateConfig` (steps, sampler, temperature, guidance, durations, batch size, seed,
    workers). Each utterance's noise is its own (`utterance_generator`), so the result does not depend
    on batching or on how the work is split. On CPU the batches go to `evaluate.synthesis_workers`
    one-thread processes (`workers` overrides; 1 = in this process, with its torch threads).
    Returns (mels, spans, missing) keyed by utt_id; an utterance whose speaker the model does not
    know is listed in `missing` rather than spoken by someone else.
    """
    from rlhf_tts.workers import resolve_workers, worker_pool

    device = torch.device(device)
    missing = {u.utt_id: f"speaker {u.speaker} unknown to the model" for u in utterances if u.speaker not in vocab.speakers}
    usable = [u for u in utterances if u.utt_id not in missing]
    ids = [vocab.symbols.ids(list(u.row["phonemes"])) for u in usable]
    mels: dict[str, np.ndarray] = {}
    spans: dict[str, list | None] = {}
    batches = _length_order([len(i) for i in ids], synthesis_batch(ev.synthesis_batch, device))
    # Worker processes are a CPU remedy; an accelerator batches in this process instead.
    n_workers = 1
    if device.type == "cpu":
        n_workers = min(len(batches), workers or resolve_workers(ev.synthesis_workers, device))

    def collect(results: list[tuple[str, np.ndarray, list | None]]) -> None:
        for utt_id, mel, span in results:
            mels[utt_id], spans[utt_id] = mel, span
        _report(progress, label, len(mels), len(usable))

    if n_workers <= 1:
        for index in batches:
            collect(_synthesize_batch(model, vocab, [usable[i] for i in index], [ids[i] for i in index], ev, features,
                                      device))
        return mels, spans, missing
    from concurrent.futures import as_completed

    with worker_pool(n_workers, _start_synthesis_worker, (model.cpu(), vocab, ev, features)) as pool:
        # Longest first, so that the last tasks to finish are short ones.
        futures = [pool.submit(_synthesize_in_worker, [usable[i] for i in index], [ids[i] for i in index])
                   for index in reversed(batches)]
        for future in as_completed(futures):
            collect(future.result())
    return mels, spans, missing


def make_system(name: str, spec: str, cfg: RunConfig, vocoder, device: str | torch.device = "cpu") -> System:  # noqa: ANN001
    """A named system from a path: a model folder (model.json + final/) or a folder of <utt_id>.wav."""
    path = Path(spec).expanduser()
    if is_model_dir(path) or (path.name == "final" and is_model_dir(path.parent)):
        return ModelSystem(name, path, cfg, vocoder, device)
    if path.is_dir():
        return WavFolderSystem(name, path, cfg.features)
    raise InputError(f"system {name!r}: {spec!r} is neither a model folder (model.json + final/) nor a folder of wavs")
