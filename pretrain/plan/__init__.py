"""Stage 2: turn a VRAM tier and a token budget into a plan and a trainer command."""
