"""Grad-TTS: score-based text-to-speech acoustic model."""
