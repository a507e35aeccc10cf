"""milroi wsi package."""
