"""Evaluation judges. Never a reward: nothing under rlhf_tts/algos, rlhf_tts/rewards or actors imports
this package (a test parses their imports), so no training loop can optimise against them."""
