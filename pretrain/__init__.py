"""How a model is trained: data, plan, optimizer, checkpoints, tracking and the loop."""
