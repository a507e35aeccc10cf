"""Training a MIL head on bags with slide labels: one bag per Adam step, early stopping on
validation AUC, seeded and deterministic (two runs on the same inputs give the same numbers)."""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.feature_file import Bag
from training.heads import MILHead, build_head
from training.thresholds import safe_auc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def bag_logits(head: MILHead, bag: Bag) -> tuple[float, np.ndarray]:
    """(slide logit, patch logits [N]) of one bag: what calibration fits on, before a sigmoid
    rounds a saturated logit to 1.0 in float32."""
    head.eval()
    out = head(bag.features)
    return float(out.slide_logit), out.patch_logits.numpy().astype(np.float64)


@torch.no_grad()
def predict(head: MILHead, bags: Sequence[Bag]) -> np.ndarray:
    """Slide probabilities, sigmoid(slide_logit), one per bag."""
    head.eval()
    return np.array([torch.sigmoid(head(b.features).slide_logit).item() for b in bags])


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    best_epoch: int                 # 1-based epoch whose weights are kept
    best_val_auc: float
    history: list[dict[str, float]]  # per epoch: train_loss, val_auc, val_loss


def train_head(config: dict, train: Sequence[Bag], labels: dict[str, int], *, epochs: int,
               lr: float, weight_decay: float, seed: int, val: Sequence[Bag] = (),
               patience: int = 10, monitor: str = "auc",
               on_epoch: Callable[[int, MILHead], None] | None = None) -> TrainResult:
    """Adam, one bag per step (with the head's `instance_sampling` < 1, a random share of its
    tiles); keeps the epoch with the best validation AUC (val loss on ties),
    or with `monitor="loss"` the lowest validation loss (better calibrated at a 0.5 threshold).

    Without validation bags it trains for exactly `epochs` epochs and keeps the last weights.
    `on_epoch(epoch, head)`, when given, sees the head after every epoch (1-based), e.g. to score
    held-out bags along the whole schedule from one run.
    """
    seed_everything(seed)
    head = build_head(config)
    stacked = torch.cat([head.prepare(b.features) for b in train])
    head.set_feature_stats(stacked.mean(0), stacked.std(0))
    y_train = np.array([labels[b.name] for b in train])
    n_pos, n_neg = int(y_train.sum()), int(len(y_train) - y_train.sum())
    pos_weight = n_neg / n_pos if n_pos and n_neg else 1.0
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = np.random.default_rng(seed)
    sampling = float(head.option("instance_sampling"))
    y_val = np.array([labels[b.name] for b in val])
    best = TrainResult({k: v.clone() for k, v in head.state_dict().items()}, 0, -np.inf, [])
    best_key = (-np.inf, -np.inf)
    stale = 0
    for epoch in range(1, epochs + 1):
        head.train()
        losses = []
        for i in order_rng.permutation(len(train)):
            features = train[i].features
            if sampling < 1.0:  # a random share of the bag's tiles for this step
                n = len(features)
                take = max(1, int(round(sampling * n)))
                features = features[np.sort(order_rng.choice(n, size=take, replace=False))]
            out = head(features)
            loss = head.loss(out, labels[train[i].name], pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        row = {"train_loss": float(np.mean(losses))}
        if len(val):
            p = predict(head, val)
            eps = 1e-7
            row["val_loss"] = float(-np.mean(y_val * np.log(p + eps) + (1 - y_val) * np.log(1 - p + eps)))
            row["val_auc"] = safe_auc(y_val, p)
            auc = np.nan_to_num(row["val_auc"], nan=0.0)
            key = (auc, -row["val_loss"]) if monitor == "auc" else (-row["val_loss"], auc)
            if key > best_key:
                best_key, stale = key, 0
                best.state = {k: v.clone() for k, v in head.state_dict().items()}
                best.best_epoch, best.best_val_auc = epoch, row["val_auc"]
            else:
                stale += 1
        best.history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, head)
        if len(val) and stale >= patience:
            break
    if not len(val):
        best.state, best.best_epoch = head.state_dict(), epochs
    return best


def head_from_state(config: dict, state: dict) -> MILHead:
    head = build_head(config)
    head.load_state_dict(state)
    return head.eval()


