"""Stage 4: what a researcher watches: train.jsonl, summary.md, plots, wandb, TensorBoard, console, compare."""
