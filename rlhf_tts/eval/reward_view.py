"""How the preference model sees a model's own sampling paths: EASPM along the sampler, per t.

    python -m rlhf_tts.eval.reward_view [--model NAME=DIR ...] [--split val] [--max-utts 50] [--steps 20]
                                        [--stochastic] [--judge] [key=value ...]

By default it compares the config's base model with its aligned model (when the align stage has
made one). Each model speaks the split's utterances (its own durations, `evaluate.temperature`, a
fixed seed; the ODE sampler the report uses, or the rollouts' stochastic one) and after every step
the state is scored by EASPM against the five emotions' prompts at that step's time: accuracy (the
target emotion scores highest), the target's mean log-probability (`align.reward=log_softmax`) and
its mean raw score S (`align.reward=score`).

This is the reward's side of the story the judges tell in the evaluation report. When the judge
and EASPM disagree about an aligned model, it says which side moved: a reward that rises where the
judge hears nothing (the policy found what EASPM likes, not what the emotion is), or a reward that
cannot read the final states of either model (accuracy at chance at t = 0: the base model's speech
is off the manifold EASPM was trained on, and no preference signal reaches the end of sampling).
It never trains anything and is no judge: EASPM is the reward being examined.

`--judge` sets the two side by side on the same final outputs (t = 0): the emotion judge hears each
through the evaluation's Griffin-Lim round trip, and the table gives EASPM's and the judge's accuracy,
how often they name the same emotion, and the outputs' level against the recordings (mean log-mel,
model − recording, same utterances). An EASPM that names one emotion for nearly every output, with
the level far from zero, reads the decoder's level drift rather than the emotion (README).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rlhf_tts.config import ConfigError, RunConfig, load_config

REPORT_TIMES = (1.0, 0.75, 0.5, 0.25, 0.0)


@torch.no_grad()
def trajectory_view(model, vocab, easpm, utterances: list, steps: int, temperature: float,  # noqa: ANN001
                    stochastic: bool, seed: int, batch: int = 8,
                    finals: dict | None = None) -> dict[float, dict[str, float]]:
    """Per report time t: EASPM accuracy, mean target log-probability and mean target score over the
    utterances' states after the sampler step that ends at t (t = 1: the initial state). `finals`, when
    given, receives utt_id → (final mel, the emotion index EASPM names for it at t = 0, the encoder's mu)."""
    from rlhf_tts.eval.systems import _length_order, utterance_generator, utterance_text_batch
    from rlhf_tts.models.gradtts import diffusion
    from rlhf_tts.models.gradtts.model import item_noise

    prompts = easpm.embed_prompts(easpm.default_prompts())
    emotion_index = {e: i for i, e in enumerate(easpm.emotions)}
    h = 1.0 / steps
    wanted = {round(1.0 - i * h, 6): i for i in range(steps + 1)}
    times = [t for t in REPORT_TIMES if round(t, 6) in wanted]
    hits: dict[float, list] = {t: [] for t in times}
    ids = [vocab.symbols.ids(list(u.row["phonemes"])) for u in utterances]
    for index in _length_order([len(i) for i in ids], batch):
        items = [utterances[i] for i in index]
        text = utterance_text_batch(items, [ids[i] for i in index], vocab, word_spans=False)
        prior = model.encode(text)
        targets = torch.tensor([emotion_index[u.emotion] for u in items])
        # Each utterance's own noise, as the evaluation draws it: with the ODE and the report's step count these
        # are the states the report judged (up to float rounding: this batches 8, padded).
        generators = [utterance_generator(seed, u.utt_id) for u in items]
        x = model.initial_state(prior, temperature, generators)

        def look(t: float) -> None:
            audio = easpm.embed_audio(x * prior.mask, prior.mask, torch.full((len(items),), t))
            logits = easpm.logits(audio, prompts)
            target = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
            named = logits.argmax(1)
            hits[t].append(torch.stack([(named == targets).float(), target - logits.logsumexp(1),
                                        target, targets.float()], 1))
            if t == 0.0 and finals is not None:  # the last step's end: the final outputs and EASPM's names
                for row, u in enumerate(items):
                    n = int(prior.lengths[row])
                    finals[u.utt_id] = (x[row, :, :n].numpy().copy(), int(named[row]),
                                        prior.mu[row, :, :n].numpy().copy())

        if 1.0 in hits:
            look(1.0)
        for i in range(steps):
            t = 1.0 - (i + 0.5) * h
            if stochastic:
                mean, variance = model.reverse_step_mean(x, t, h, prior)
                x = (mean + torch.sqrt(variance) * item_noise(x, prior.lengths, generators)) * prior.mask
            else:
                score = model.score(x, t, prior)
                x = diffusion.ode_step(x, prior.mu, score, t, h, model.cfg.beta_min, model.cfg.beta_max) * prior.mask
            t_next = round(1.0 - (i + 1) * h, 6)
            if t_next in hits:
                look(t_next)
    out = {}
    for t, parts in hits.items():
        values = torch.cat(parts).numpy()
        out[t] = _summary(values) | {"by_emotion": {
            e: _summary(values[values[:, 3] == i]) for i, e in enumerate(easpm.emotions) if (values[:, 3] == i).any()}}
    return out


def _summary(values: np.ndarray) -> dict[str, float]:
    """Accuracy, mean target log-probability and mean target score of rows (hit, log p, S, target)."""
    return {"accuracy": float(values[:, 0].mean()), "log_prob": float(values[:, 1].mean()),
            "score": float(values[:, 2].mean()), "n": int(len(values))}


def judge_agreement(finals: dict, utterances: list, easpm_emotions: list[str], judge, features) -> dict:  # noqa: ANN001
    """EASPM (on the final mels) against the emotion judge (on their Griffin-Lim round trips, as the
    evaluation hears them), and the outputs' level against the recordings of the same utterances, beside
    the encoder's mu's (Grad-TTS's frame-wise mean of the mel: where the decoder's level should sit)."""
    from rlhf_tts.data.resynthesis import griffin_lim_mels

    ids = [u.utt_id for u in utterances if u.utt_id in finals]
    by_id = {u.utt_id: u for u in utterances}
    heard = judge.judge_mels(griffin_lim_mels([finals[i][0] for i in ids], features)).predictions
    judged = np.array([easpm_emotions.index(judge.emotions[k]) for k in heard])
    named = np.array([finals[i][1] for i in ids])
    target = np.array([easpm_emotions.index(by_id[i].emotion) for i in ids])
    level = [float(finals[i][0].mean() - by_id[i].mel.mean()) for i in ids]
    prior_level = [float(finals[i][2].mean() - by_id[i].mel.mean()) for i in ids]
    confusion = np.zeros((len(easpm_emotions), len(easpm_emotions)), dtype=int)  # rows EASPM, columns the judge
    np.add.at(confusion, (named, judged), 1)
    return {"n": len(ids), "easpm_accuracy": float(np.mean(named == target)), "judge_accuracy": float(np.mean(judged == target)),
            "agreement": float(np.mean(named == judged)), "level_offset": float(np.mean(level)),
            "prior_level_offset": float(np.mean(prior_level)),
            "easpm_named": np.bincount(named, minlength=len(easpm_emotions)).tolist(),
            "judge_named": np.bincount(judged, minlength=len(easpm_emotions)).tolist(),
            "confusion_easpm_by_judge": confusion.tolist()}


LEVEL_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@torch.no_grad()
def level_sensitivity(easpm, utterances: list, offsets: tuple[float, ...] = LEVEL_OFFSETS,  # noqa: ANN001
                      t: float = 0.0) -> dict:
    """EASPM on the split's recordings shifted by a common level (log-mel units) at time t: per target
    emotion the mean target log-probability at each offset, and how often each emotion is named.

    A reward whose rows slope pays a decoder for moving its level, a change one decoder makes for every
    emotion at once (`easpm.level_invariant` removes the state's own level before scoring: flat rows)."""
    prompts = easpm.embed_prompts(easpm.default_prompts())
    emotions = list(easpm.emotions)
    log_prob = {e: [[] for _ in offsets] for e in emotions}
    named = np.zeros((len(offsets), len(emotions)), dtype=int)
    for u in utterances:
        mel = torch.as_tensor(np.asarray(u.mel), dtype=torch.float32)[None]
        states = torch.cat([mel + offset for offset in offsets])
        audio = easpm.embed_audio(states, torch.ones(len(offsets), 1, mel.shape[-1]), t)
        logp = torch.log_softmax(easpm.logits(audio, prompts), -1)
        for j in range(len(offsets)):
            log_prob[u.emotion][j].append(float(logp[j, emotions.index(u.emotion)]))
            named[j, int(logp[j].argmax())] += 1
    return {"t": t, "offsets": list(offsets),
            "log_prob": {e: [float(np.mean(v)) if v else float("nan") for v in rows] for e, rows in log_prob.items()},
            "named": named.tolist()}


def reward_view(cfg: RunConfig, models: dict[str, str] | None, split: str, max_utts: int, steps: int,
                stochastic: bool, with_judge: bool = False) -> dict:
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.errors import InputError
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.evaluate_stage import aligned_model_dir
    from rlhf_tts.eval.systems import is_model_dir, synthesis_batch
    from rlhf_tts.training.easpm import easpm_location
    from rlhf_tts.training.pretrain import BaseModel, base_model_location

    if not models:
        models = {"base model": str(base_model_location(cfg).directory)}
        aligned = aligned_model_dir(cfg)
        if aligned is not None:
            models["aligned model"] = str(aligned)
    for name, path in models.items():
        if not is_model_dir(path):
            raise InputError(f"--model {name}={path}: not a model folder (model.json + final/state.json)")
    location = easpm_location(cfg)
    if not location.exists():
        raise InputError(f"no EASPM at {location.directory}: run the easpm stage first")
    easpm = location.load("cpu").eval()
    dataset, _ = dataset_location(cfg)
    utterances = load_split(dataset, split, max_utts or None, cfg.features)
    if not utterances:
        raise InputError(f"--split {split}: the split is empty")
    judge = None
    if with_judge:
        from rlhf_tts.eval.judges.emotion import EmotionJudge, emotion_judge_location

        judge_location = emotion_judge_location(cfg)
        if not judge_location.exists():
            raise InputError(f"--judge: no emotion judge at {judge_location.directory}: run the judges stage first")
        judge = EmotionJudge.load(judge_location)
    result = {"split": split, "utterances": len(utterances), "steps": steps, "stochastic": stochastic,
              "emotions": list(easpm.emotions),
              "temperature": cfg.evaluate.temperature, "chance_accuracy": 1 / len(easpm.emotions),
              "chance_log_prob": float(np.log(1 / len(easpm.emotions))),
              "level": level_sensitivity(easpm, utterances), "models": {}}
    for name, path in models.items():
        model, vocab, _ = BaseModel(Path(path)).load("cpu")
        model.eval()
        finals: dict | None = {} if judge is not None else None
        view = trajectory_view(model, vocab, easpm, utterances, steps, cfg.evaluate.temperature, stochastic,
                               cfg.evaluate.seed, synthesis_batch(cfg.evaluate.synthesis_batch, torch.device("cpu")),
                               finals)
        result["models"][name] = {"path": path, "by_t": {f"{t:.2f}": v for t, v in view.items()}}
        if judge is not None:
            result["models"][name]["judge"] = judge_agreement(finals, utterances, list(easpm.emotions), judge,
                                                              cfg.features)
    return result


def report_markdown(result: dict) -> str:
    names = list(result["models"])
    times = list(next(iter(result["models"].values()))["by_t"])
    lines = [f"# EASPM along each model's sampling path ({result['split']} split, {result['utterances']} utterances, "
             f"{result['steps']} {'stochastic' if result['stochastic'] else 'ODE'} steps)\n",
             f"Chance: accuracy {result['chance_accuracy']:.0%}, log-probability {result['chance_log_prob']:.2f}.\n",
             "| t | " + " | ".join(f"{n}: accuracy | {n}: log p | {n}: S" for n in names) + " |",
             "|---:|" + "---:|" * (3 * len(names))]
    for t in times:
        cells = []
        for n in names:
            v = result["models"][n]["by_t"][t]
            cells += [f"{v['accuracy']:.0%}", f"{v['log_prob']:.2f}", f"{v['score']:.2f}"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    emotions = list(next(iter(result["models"][names[0]]["by_t"].values()))["by_emotion"])
    lines += ["", "## Per target emotion: accuracy / target log-probability\n",
              "The judge's per-emotion tables in the evaluation report are the other side: an emotion whose reward "
              "rises here while its judged recall does not is one the policy learned to please EASPM on.\n",
              "| model | t | " + " | ".join(emotions) + " |", "|---|---:|" + "---:|" * len(emotions)]
    for n in names:
        for t in times:
            by_emotion = result["models"][n]["by_t"][t]["by_emotion"]
            lines.append(f"| {n} | {t} | " + " | ".join(
                f"{by_emotion[e]['accuracy']:.0%} / {by_emotion[e]['log_prob']:.2f}" if e in by_emotion else "–"
                for e in emotions) + " |")
    level = result.get("level")
    if level:
        offsets = level["offsets"]
        lines += ["", f"## EASPM on the recordings under a level offset (t = {level['t']:g})\n",
                  "Target log-probability per true emotion when every recording is shifted by the same level "
                  "(log-mel units). A row that slopes is a reward that pays the decoder for moving its level.\n",
                  "| emotion | " + " | ".join(f"{o:+g}" for o in offsets) + " |", "|---|" + "---:|" * len(offsets)]
        for e, values in level["log_prob"].items():
            lines.append(f"| {e} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        lines.append("| named (" + " ".join(e[:2] for e in result["emotions"]) + ") | "
                     + " | ".join(" ".join(map(str, row)) for row in level["named"]) + " |")
    judged = [n for n in names if "judge" in result["models"][n]]
    if judged:
        lines += ["", "## The reward against the judge (final outputs, t = 0)\n",
                  "EASPM reads the final mel; the judge hears its Griffin-Lim round trip, as in the evaluation. "
                  "Level: mean log-mel of the outputs minus that of the same utterances' recordings; mu's: the "
                  "encoder's prior mean's (the decoder's own share of the level is the difference).\n",
                  "| model | n | EASPM accuracy | judge accuracy | agreement | level (log-mel) | mu's level "
                  "| EASPM names | judge names |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for n in judged:
            j = result["models"][n]["judge"]
            lines.append(f"| {n} | {j['n']} | {j['easpm_accuracy']:.0%} | {j['judge_accuracy']:.0%} | {j['agreement']:.0%} | "
                         f"{j['level_offset']:+.2f} | {j['prior_level_offset']:+.2f} | "
                         f"{' '.join(map(str, j['easpm_named']))} | "
                         f"{' '.join(map(str, j['judge_named']))} |")
        lines.append(f"\n(names: how many outputs each names as {', '.join(result['emotions'])}, in that order)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tts.eval.reward_view", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR (repeatable; default base + aligned)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--max-utts", type=int, default=50, help="an even stride of N utterances (0 = all)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (align.sampler_steps is 20)")
    parser.add_argument("--stochastic", action="store_true", help="the rollouts' stochastic sampler instead of the ODE")
    parser.add_argument("--judge", action="store_true",
                        help="also hear the final outputs with the emotion judge (needs the judges stage): agreement, level")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from rlhf_tts.errors import InputError

    try:
        models = {}
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise InputError(f"--model {spec!r}: expected NAME=DIR")
            models[name] = path
        cfg = load_config(args.config, args.overrides)
        result = reward_view(cfg, models, args.split, args.max_utts, args.steps, args.stochastic, args.judge)
    except (ConfigError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_view.json").write_text(json.dumps(result, indent=1))
    (out / "reward_view.md").write_text(report_markdown(result))
    print(report_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
