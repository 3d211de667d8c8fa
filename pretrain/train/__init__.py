"""Stage 3: the trainer: one TrainConfig, a session that builds or resumes a run, the loop."""
