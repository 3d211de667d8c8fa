"""Stage 1: turn text into memory-mapped token shards, and read them back in a fixed order."""
