"""milroi serving package."""
