"""The naive baseline: per-patch features the way most MIL code computes them (CLAM's
`extract_features_fp.py`), for `benchmarks.run` to compare milroi against.

    python -m benchmarks.naive --slide PATH [--tiles 64] [--batch-size 32] [--device cpu]

As CLAM does it: a torch Dataset whose `__getitem__` calls openslide's `read_region` for one
patch, converts the PIL image to RGB, and applies torchvision transforms (ToTensor, ImageNet
Normalize); a DataLoader batches them (CLAM passes num_workers=8 only on CUDA, none on CPU);
the model is a ResNet-50 in torch eager under inference_mode, one batch at a time, features
copied back to numpy. Nothing overlaps: reading, decoding and the model take turns.

The network is milroi's own ResNet-50 trunk (same layer, same random-init seed), so the naive
features are the same numbers as milroi's fp32 ones (`benchmarks.run` checks the cosine) and
the comparison measures only the way the work is done. The patch coordinates are milroi's
tissue grid of the slide (not timed on either side).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

TILE = 224


class PatchDataset:
    """CLAM's Whole_Slide_Bag_FP: one openslide read_region + transforms per item."""

    def __init__(self, slide_path: str | Path, coords: np.ndarray, tile_size: int = TILE):
        import openslide
        from torchvision import transforms

        from training.backbone import IMAGENET_MEAN, IMAGENET_STD

        self.wsi = openslide.OpenSlide(str(slide_path))
        self.coords = np.asarray(coords)
        self.tile_size = tile_size
        self.transforms = transforms.Compose([transforms.ToTensor(),
                                              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int):
        x, y = (int(v) for v in self.coords[index])
        image = self.wsi.read_region((x, y), 0, (self.tile_size, self.tile_size)).convert("RGB")
        return self.transforms(image)


def naive_features(slide_path: str | Path, coords: np.ndarray, *, batch_size: int = 32,
                   device: str = "cpu", layer: str = "pool", seed: int = 0,
                   warmup: bool = True) -> dict:
    """Features of the patches at `coords`, CLAM-style; {"features", "seconds", "tiles_per_s"}.

    Timed: dataset reads + transforms + model + copy back, from the first batch to the last
    (the model is built and, with `warmup`, run once on one batch before the clock starts).
    """
    import torch
    from torch.utils.data import DataLoader

    from training.backbone import build_backbone

    model = build_backbone("none", layer=layer, seed=seed).trunk.to(device).eval()
    dataset = PatchDataset(slide_path, coords)
    loader_kwargs = {"num_workers": 8, "pin_memory": True} if device.startswith("cuda") else {}
    loader = DataLoader(dataset, batch_size=batch_size, **loader_kwargs)
    if warmup:
        with torch.inference_mode():
            model(torch.stack([dataset[i] for i in range(min(batch_size, len(dataset)))]).to(device))
    features = []
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            features.append(torch.flatten(model(batch.to(device)), 1).cpu().numpy())
    seconds = time.perf_counter() - started
    return {"features": np.concatenate(features), "seconds": seconds,
            "tiles_per_s": len(dataset) / seconds, "tiles": len(dataset),
            "batch_size": batch_size, "device": device, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, required=True)
    parser.add_argument("--tiles", type=int, default=64, help="tissue tiles to extract (64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from wsi.grid import tiles_for_slide
    from wsi.slide import open_slide

    with open_slide(args.slide) as slide:
        _, grid = tiles_for_slide(slide)
    coords = grid.coords[np.linspace(0, len(grid) - 1, min(args.tiles, len(grid))).astype(int)]
    result = naive_features(args.slide, coords, batch_size=args.batch_size, device=args.device)
    print(f"naive (CLAM-style) features: {result['tiles']} tiles in {result['seconds']:.1f} s = "
          f"{result['tiles_per_s']:.1f} tiles/s on {args.device} "
          f"({result['torch_threads']} torch threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
