"""Speak text with a trained model.

    python -m rlhf_tts.synthesize --text "Hello there." --emotion Happy --speaker 0 --out hello.wav
    python -m rlhf_tts.synthesize --batch lines.txt --out-dir wavs/     # lines: text[<TAB>emotion[<TAB>speaker]]

The model is the base model of the config (`[key=value ...]`, default preset tiny) unless `--model
DIR` names one. Every input is checked before anything is synthesised: an unknown emotion or
speaker, empty text, or characters the front end cannot read is a one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf_tts.errors import InputError

EXIT_USAGE = 2


@dataclass(frozen=True)
class Request:
    text: str
    emotion: str
    speaker: str
    out: Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tts.synthesize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", help="the sentence to speak")
    parser.add_argument("--emotion", default="Neutral", help="Neutral, Angry, Happy, Sad or Surprise")
    parser.add_argument("--speaker", default="0", help="speaker index or name (e.g. 0 or spk01)")
    parser.add_argument("--out", help="output wav (single mode)")
    parser.add_argument("--batch", help="text file: one request per line, text[<TAB>emotion[<TAB>speaker]]")
    parser.add_argument("--out-dir", help="output folder (batch mode)")
    parser.add_argument("--model", help="base model folder (default: the one the config trained)")
    parser.add_argument("--steps", type=int,
                        help="reverse-diffusion steps (default: the config's evaluate.sampler_steps, what the "
                        "evaluation report measured)")
    parser.add_argument("--temperature", type=float,
                        help="X_1 ~ N(mu, I/temperature) (default: the config's evaluate.temperature)")
    parser.add_argument("--output-level", choices=["decoder", "prior"],
                        help="each mel band's level: the sampler's (decoder, Grad-TTS) or the encoder's mu's (prior) "
                        "(default: the config's evaluate.output_level)")
    parser.add_argument("--stochastic", action="store_true", help="Euler-Maruyama instead of the probability-flow ODE")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--length-scale", type=float, default=1.0, help=">1 speaks slower")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocoder", choices=["griffin_lim", "hifigan"], default="griffin_lim")
    parser.add_argument("--hifigan", help="HiFi-GAN checkpoint (official format) for --vocoder hifigan")
    parser.add_argument("--config", help="YAML config (locates the model when --model is not given)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    return parser


def _requests(args: argparse.Namespace) -> list[Request]:
    if bool(args.text is not None) == bool(args.batch):
        raise InputError("give exactly one of --text (with --out) or --batch (with --out-dir)")
    if args.text is not None:
        if not args.out:
            raise InputError("--text needs --out FILE.wav")
        return [Request(args.text, args.emotion, args.speaker, Path(args.out))]
    if not args.out_dir:
        raise InputError("--batch needs --out-dir DIR")
    path = Path(args.batch)
    if not path.is_file():
        raise InputError(f"--batch: {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        emotion = fields[1].strip() if len(fields) > 1 and fields[1].strip() else args.emotion
        speaker = fields[2].strip() if len(fields) > 2 and fields[2].strip() else args.speaker
        requests.append(Request(fields[0], emotion, speaker, Path(args.out_dir) / f"{len(requests):04d}_{emotion}.wav"))
    if not requests:
        raise InputError(f"--batch: {path} has no lines")
    return requests


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rlhf_tts.config import ConfigError, load_config

    try:
        requests = _requests(args)
        cfg = load_config(args.config, args.overrides)
        args.steps = cfg.evaluate.sampler_steps if args.steps is None else args.steps
        args.temperature = cfg.evaluate.temperature if args.temperature is None else args.temperature
        args.output_level = args.output_level or cfg.evaluate.output_level
        if args.steps < 1 or args.temperature <= 0 or args.length_scale <= 0:
            raise InputError("--steps must be >= 1, --temperature and --length-scale > 0")
        if args.vocoder == "hifigan" and not args.hifigan:
            raise InputError("--vocoder hifigan needs --hifigan CHECKPOINT")
    except (InputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE

    import soundfile as sf
    import torch

    from rlhf_tts.inference import Synthesizer

    try:
        synthesizer = Synthesizer.from_config(cfg, args.model, vocoder=args.vocoder, hifigan=args.hifigan)
        prepared = []
        for number, request in enumerate(requests, start=1):
            try:
                prepared.append(synthesizer.prepare(request.text, request.emotion, request.speaker))
            except InputError as err:
                raise InputError(f"{err} (request {number})" if args.batch else str(err)) from None
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    generator = torch.Generator().manual_seed(args.seed)
    for request, item in zip(requests, prepared):
        audio = synthesizer.speak([item], n_steps=args.steps, temperature=args.temperature, stochastic=args.stochastic,
                                  guidance=args.guidance, length_scale=args.length_scale, generator=generator,
                                  output_level=args.output_level)[0]
        request.out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(request.out, audio, synthesizer.sample_rate, subtype="PCM_16")
        print(f"{request.out}  ({request.emotion}, speaker {item.speaker_name}, {len(audio) / synthesizer.sample_rate:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
