"""MLflow model registry: promotion of a model version to an alias, and alias resolution.

`milroi-train promote NAME VERSION --alias champion` moves the alias only when the candidate's
validation AUC is at least the current holder's (`--force` overrides), so a worse model never
replaces the served one by accident. The AUC is the version's `val_auc` tag (set by
`milroi-train export`), else the `val_auc` metric of its source run.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass

from core.cli import add_tracking_uri_argument
from core.errors import RegistryError
from core.tracking import ModelUri, mlflow_client, resolve_tracking_uri

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"


class PromotionRefused(RegistryError):
    """The candidate version is worse than the alias holder (and --force was not given)."""


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in {"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND",
                                              "INVALID_PARAMETER_VALUE"}


def version_by_alias(name: str, alias: str, tracking_uri: str | None = None):
    """The ModelVersion that `models:/NAME@ALIAS` points at, or None when the alias is unset."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise RegistryError(f"MLflow registry {resolve_tracking_uri(tracking_uri)}: cannot "
                            f"resolve {name}@{alias}: "
                            f"{exc.message}") from None


def resolve_model_uri(uri: str, tracking_uri: str | None = None):
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> its ModelVersion (`.version`,
    `.source`, `.run_id`, `.tags`); a RegistryError naming the URI when there is none."""
    from mlflow.exceptions import MlflowException

    parsed = ModelUri.parse(uri)
    name = parsed.name
    if parsed.alias:
        found = version_by_alias(name, parsed.alias, tracking_uri)
    else:
        try:
            found = mlflow_client(tracking_uri).get_model_version(name, parsed.version)
        except MlflowException as exc:
            if not _not_found(exc):
                raise RegistryError(f"MLflow registry: cannot resolve {uri}: {exc.message}") from None
            found = None
    if found is None:
        raise RegistryError(f"no model version at {uri} in the MLflow registry "
                            f"{resolve_tracking_uri(tracking_uri)}")
    return found


def validation_auc(version, tracking_uri: str | None = None) -> float:
    """The version's validation AUC: its `val_auc` tag, else its run's metric; NaN if neither."""
    tag = (version.tags or {}).get("val_auc")
    if tag not in (None, "", "None"):
        return float(tag)
    if version.run_id:
        from mlflow.exceptions import MlflowException

        try:
            metrics = mlflow_client(tracking_uri).get_run(version.run_id).data.metrics
        except MlflowException:
            return math.nan
        return float(metrics.get("val_auc", math.nan))
    return math.nan


@dataclass
class Promotion:
    name: str
    alias: str
    version: str
    val_auc: float
    previous_version: str | None
    previous_val_auc: float | None

    def __str__(self) -> str:
        was = (f"; was version {self.previous_version} (val_auc {self.previous_val_auc:.4f})"
               if self.previous_version else "")
        return (f"{self.name} version {self.version} (val_auc {self.val_auc:.4f}) is now "
                f"@{self.alias}{was}")


def promote(name: str, version: str | int, alias: str = DEFAULT_ALIAS, force: bool = False,
            tracking_uri: str | None = None) -> Promotion:
    """Point `alias` at `version` unless its validation AUC is below the current holder's.

    Raises PromotionRefused (a RegistryError) then, and also when the candidate's AUC is unknown
    while the holder's is known; `force=True` promotes anyway.
    """
    from mlflow.exceptions import MlflowException

    c = mlflow_client(tracking_uri)
    try:
        candidate = c.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"no version {version} of model {name!r} in the MLflow registry: "
                            f"{exc.message}") from None
    auc = validation_auc(candidate, tracking_uri)
    holder = version_by_alias(name, alias, tracking_uri)
    holder_auc = validation_auc(holder, tracking_uri) if holder is not None else None
    if holder is not None and holder.version == candidate.version:
        log.info("%s@%s already points at version %s", name, alias, candidate.version)
    elif holder is not None and not force:
        worse = auc < holder_auc if not math.isnan(holder_auc) else False
        if worse or (math.isnan(auc) and not math.isnan(holder_auc)):
            raise PromotionRefused(
                f"refusing to move {name}@{alias} from version {holder.version} "
                f"(val_auc {holder_auc:.4f}) to version {candidate.version} (val_auc {auc:.4f}): "
                f"lower validation AUC; pass --force to promote anyway")
    c.set_registered_model_alias(name, alias, candidate.version)
    moved_from = holder is not None and holder.version != candidate.version
    return Promotion(name, alias, str(candidate.version), auc,
                     str(holder.version) if moved_from else None, holder_auc)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registered model name")
    parser.add_argument("version", help="model version to promote")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"alias to move (default {DEFAULT_ALIAS})")
    parser.add_argument("--force", action="store_true",
                        help="promote even if its validation AUC is below the current holder's")
    add_tracking_uri_argument(parser)


def run(args: argparse.Namespace) -> int:
    result = promote(args.name, args.version, alias=args.alias, force=args.force,
                     tracking_uri=args.tracking_uri)
    if args.force and result.previous_val_auc is not None and result.val_auc < result.previous_val_auc:
        log.warning("forced: version %s has a lower val_auc than version %s", result.version,
                    result.previous_version)
    print(result)
    return 0
