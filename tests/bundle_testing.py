"""The small real model bundle that the serving-side test folders share.

A seeded random-init ResNet-50 (layer3, 1024-d: no weights download here) and a CHOWDER head,
exported by training.export.export_bundle exactly as `milroi-train export` does.
"""
from __future__ import annotations

from pathlib import Path


def export_test_bundle(folder: Path, name: str, domain=None) -> Path:
    """Export the seeded test bundle into `folder` (its manifest's name is `name`); `domain`: a
    core.domain.DomainModel of its training data to carry (none by default)."""
    import torch

    from training.backbone import build_backbone
    from training.export import export_bundle
    from training.heads import build_head

    torch.manual_seed(0)
    backbone = build_backbone("none", layer="layer3", seed=0)
    head = build_head({"kind": "chowder", "in_dim": 1024, "k": 3}).eval()
    return export_bundle(folder, backbone=backbone, head=head,
                         manifest_extra={"name": name, "slide_threshold": 0.5}, domain=domain)
