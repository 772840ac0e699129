"""Training: `loop` (`train(config, workdir)`), `steps` (the train state and
the four jitted phases), `checkpointer` (Orbax saves, resume, preemption),
`monitor` (metrics files, progress line, non-finite guard)."""
