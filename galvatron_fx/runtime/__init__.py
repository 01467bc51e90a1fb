"""Runtime: process groups, collectives, pipeline, checkpoints, launch (later issues)."""
