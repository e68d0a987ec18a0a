"""Compare systems with the independent judges: `python -m rlhf_tts.evaluate [options] [key=value ...]`.

    python -m rlhf_tts.evaluate                                   # resynthesis, recordings, base (+ aligned)
    python -m rlhf_tts.evaluate --system mine=runs/x/wavs --system other=/models/gradtts_b
    python -m rlhf_tts.evaluate --degraded evaluate.max_utts=50 output_dir=runs/check

A system is a model folder (`model.json` + `final/`, what pretraining and alignment write) or a
folder of `<utt_id>.wav` files for the utterances of `evaluate.split`. Ground-truth resynthesis
(the reference mel through the same vocoder) is always the first row. The report (markdown, JSON,
per-utterance CSV, plots, audio examples) goes to `<output_dir>/evaluate/` (or `--out`) and to
MLflow; the table and the seconds each system took are printed. A bad config or input is a
one-line error with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_tts.config import ConfigError, load_config

EXIT_INPUT_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tts.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--config", help="YAML file with config keys (merged over the preset)")
    parser.add_argument("--system", action="append", default=[], metavar="NAME=PATH",
                        help="add a system: a model folder or a folder of <utt_id>.wav (repeatable)")
    parser.add_argument("--no-base", action="store_true", help="leave out the config's base model")
    parser.add_argument("--no-aligned", action="store_true", help="leave out the config's aligned model")
    parser.add_argument("--degraded", action="store_true",
                        help="add the deliberately degraded system (wrong emotion + noise), a check of the metrics")
    parser.add_argument("--max-utts", type=int, help="evaluate an even stride of N utterances (evaluate.max_utts)")
    parser.add_argument("--out", help="report folder (default <output_dir>/evaluate)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. evaluate.split=val")
    return parser


def parse_systems(items: list[str]) -> dict[str, str]:
    systems: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--system {item!r}: expected NAME=PATH")
        if name.strip() in systems:
            raise ConfigError(f"--system: {name.strip()!r} given twice")
        systems[name.strip()] = path.strip()
    return systems


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from rlhf_tts.errors import InputError

    args = _parser().parse_args(argv)
    console = Console()
    try:
        overrides = list(args.overrides)
        if args.max_utts is not None:
            overrides.append(f"evaluate.max_utts={args.max_utts}")
        cfg = load_config(args.config, overrides)
        extra = parse_systems(args.system)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    from rlhf_tts.eval.evaluate_stage import print_report, run_evaluation
    from rlhf_tts.run import StageProgress, progress_bar
    from rlhf_tts.tracking import tracked_run

    try:
        with tracked_run(cfg, run_name=f"evaluate-{cfg.evaluate.split}") as tracker, progress_bar(console) as progress:
            report, folder, notes = run_evaluation(
                cfg, StageProgress(progress), tracker, base="skip" if args.no_base else "auto",
                aligned="skip" if args.no_aligned else "auto", extra=extra,
                degraded=True if args.degraded else None, out_dir=args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print_report(console, report, folder, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
