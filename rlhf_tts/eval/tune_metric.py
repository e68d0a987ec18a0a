"""The Tune trials' metric: Emo SIM and emotion recall of a policy, judged like the evaluate stage.

`policy_emotion_metrics` synthesises the first `n_utterances` validation utterances (an even stride,
the model's speakers only) with each utterance's own text, speaker and emotion, the evaluate
stage's sampler settings and a fixed seed (so trials and reports are comparable), vocodes them with
Griffin-Lim and asks the emotion judge. Validation, not test: a sweep that picks its winner on the
test split would report an optimistic test figure. The judge and the references' embeddings are
loaded once per process and reused across reports of a trial. The judge is never a reward: only
this function, which runs after the learner's update, calls it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_tts.config import RunConfig

_CACHE: dict[tuple, tuple] = {}


def _judge_and_references(cfg: RunConfig, n_utterances: int, speakers: tuple[str, ...]):  # noqa: ANN202
    from rlhf_tts.data.pipeline import dataset_location
    from rlhf_tts.eval.corpus import load_split
    from rlhf_tts.eval.judges.emotion import EmotionJudge, emotion_judge_location, train_emotion_judge

    location = emotion_judge_location(cfg)
    key = (str(location.directory), n_utterances, speakers)
    if key not in _CACHE:
        train_emotion_judge(cfg)  # a lookup when the judges stage has run
        judge = EmotionJudge.load(location, "cpu", cfg.judges.batch_size)
        dataset, _ = dataset_location(cfg)
        utterances = [u for u in load_split(dataset, "val", None, cfg.features) if u.speaker in speakers]
        if n_utterances and len(utterances) > n_utterances:
            utterances = utterances[:: len(utterances) // n_utterances][:n_utterances]
        if not utterances:
            from rlhf_tts.errors import InputError

            raise InputError("policy_emotion_metrics: the val split has no utterances of the policy's speakers")
        references = judge.judge_mels([u.mel for u in utterances]).embeddings
        _CACHE[key] = (judge, utterances, references)
    return _CACHE[key]


def policy_emotion_metrics(cfg: RunConfig, policy: Any, vocab: Any, n_utterances: int) -> dict[str, float]:
    """{'emo_sim', 'emotion_recall', 'n_utterances'} of `policy` (a GradTTS) on validation utterances."""
    import torch

    from rlhf_tts.eval.metrics import cosine_rows, macro_recall
    from rlhf_tts.eval.systems import synthesize_utterances, vocode
    from rlhf_tts.models.vocoder import GriffinLimVocoder

    judge, utterances, references = _judge_and_references(cfg, n_utterances, tuple(vocab.speakers))
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    try:
        # In process (workers=1): a Tune trial runs inside its own CPU allotment, which worker processes
        # sized by the node's cores would overrun.
        mels, _, _ = synthesize_utterances(policy, vocab, utterances, cfg.evaluate, cfg.features, device, workers=1)
    finally:
        policy.train(was_training)
    vocoder = GriffinLimVocoder(cfg.features)
    audio = vocode([torch.as_tensor(mels[u.utt_id]).cpu().numpy() for u in utterances], vocoder, cfg.features,
                   cfg.evaluate.vocoder_batch)
    judged = judge.judge_audio(audio, cfg.features.sample_rate)
    targets = np.array([judge.emotions.index(u.emotion) for u in utterances])
    return {"emo_sim": float(cosine_rows(judged.embeddings, references).mean()),
            "emotion_recall": macro_recall(targets, judged.predictions, len(judge.emotions)),
            "n_utterances": float(len(utterances))}
