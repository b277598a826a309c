"""The verification ladder as library code: oracle files, finite differences, release checkpoints."""
