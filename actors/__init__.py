"""Ray plumbing for rlhf_tts: rollout, reward and learner actors, weight broadcast, placement and the
orchestrator loop. Transport only: every computation these actors run is a function in `rlhf_tts`.
The actors arrive with the EASPO-on-Ray milestone; this package is installed now so that the
layout, and the rule that `rlhf_tts` never imports `ray`, hold from the first version."""
