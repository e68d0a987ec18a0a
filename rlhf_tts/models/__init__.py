"""Acoustic models trained and fine-tuned by rlhf_tts."""
