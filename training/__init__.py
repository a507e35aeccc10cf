"""milroi training package."""
