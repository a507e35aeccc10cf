"""The sub-command dispatcher of `milroi-train` and `milroi-serve`, and the option groups both
sides declare (Ray, MLflow tracking URI), defined once.

Each sub-command lives in its own module, which exposes `configure_parser(parser)` and
`run(args) -> int`. Only the module of the command being run is imported, so `milroi-train tiles`
starts without importing torch and `milroi-serve --help` without onnxruntime.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Mapping, Sequence

from core.errors import MilroiError
from core.ray_cluster import DEFAULT_ACTOR_CPUS, DEFAULT_ACTOR_GPUS, DEFAULT_MAX_RESTARTS
from core.tiling import DEFAULT_TILING, MPP_CSV, MPP_TOLERANCE, TilingParams, TissueParams
from core.tracking import tracking_uri_help


def dispatch(prog: str, description: str, commands: Mapping[str, tuple[str, str]],
             argv: Sequence[str] | None = None) -> int:
    """Run `prog COMMAND ...`; `commands` maps a name to (module path, one-line help)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in commands:
        listing = "\n".join(f"  {name:<15} {summary}" for name, (_, summary) in commands.items())
        print(f"usage: {prog} COMMAND [options]\n\n{description}\n\ncommands:\n{listing}\n\n"
              f"Run '{prog} COMMAND --help' for the options of one command.")
        if argv and argv[0] not in {"-h", "--help"}:
            print(f"\n{prog}: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(commands[name][0])
    except ModuleNotFoundError as exc:
        if not commands[name][0].startswith(f"{exc.name}.") and exc.name != commands[name][0]:
            raise   # a dependency of the command is missing: its own message says which
        # The command's package is not in this install (the serve image has no viewer/)
        print(f"{prog} {name}: not in this install ({exc.name} is missing): install milroi "
              "with pip install -e '.[serve]' from a checkout", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=commands[name][1])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    module.configure_parser(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except MilroiError as exc:  # a bad slide or parameter: one clear line, no traceback
        print(f"{prog} {name}: error: {exc}", file=sys.stderr)
        return 1


def add_ray_arguments(parser: argparse.ArgumentParser, actor_holds: str) -> None:
    """The `--ray*` options of the commands that can spread slides over a Ray cluster
    (`milroi-serve score`, `milroi-train features`); Ray itself is imported only when used."""
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="spread the slides over Ray actors: auto (the cluster of this "
                             "node), HOST:6379, ray://HOST:10001 or local (docs/scale-out.md)")
    parser.add_argument("--ray-actors", type=int, default=None,
                        help=f"with --ray: actors, each holding one {actor_holds} (default: as "
                             "many as the cluster fits)")
    parser.add_argument("--ray-num-cpus", type=float, default=DEFAULT_ACTOR_CPUS,
                        help=f"with --ray: CPUs per actor ({DEFAULT_ACTOR_CPUS})")
    parser.add_argument("--ray-num-gpus", type=float, default=DEFAULT_ACTOR_GPUS,
                        help=f"with --ray: GPUs per actor (default {DEFAULT_ACTOR_GPUS}; 1 on a "
                             "GPU cluster)")
    parser.add_argument("--ray-max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                        help="with --ray: restarts of a dead actor, each re-running its slide "
                             f"({DEFAULT_MAX_RESTARTS})")


def add_tracking_uri_argument(parser: argparse.ArgumentParser) -> None:
    """`--tracking-uri`: resolved by core.tracking.resolve_tracking_uri (flag, env, default)."""
    parser.add_argument("--tracking-uri", default=None, help=tracking_uri_help())


def add_tiling_arguments(parser: argparse.ArgumentParser, model_states: bool = False) -> None:
    """`--tile-size`, `--mpp`, `--min-tissue`: the model's input and the tile grid
    (core.tiling.TilingParams; each slide is read at that scale, wsi.scale). `model_states`:
    the tile size and pixel size default to what the model states (`features`: the encoder's
    input), so both flags default to None here and `tiling_from_args` takes them from it."""
    d = DEFAULT_TILING
    size_default = "the encoder's input" if model_states else d.tile_size
    mpp_default = "the encoder's" if model_states else f"{d.target_mpp}, Camelyon16 at 40x"
    parser.add_argument("--tile-size", type=int, default=None if model_states else d.tile_size,
                        help=f"tile side in px at --mpp: the model's input (default "
                             f"{size_default})")
    parser.add_argument("--mpp", type=float, default=None if model_states else d.target_mpp,
                        dest="target_mpp",
                        help=f"pixel size (um/px) the tiles are read and measured at, whatever "
                             f"the scanner: slides within {MPP_TOLERANCE * 100:.0f}%% of it are read as "
                             f"they are, others from the nearest finer level and resized "
                             f"(default {mpp_default})")
    parser.add_argument("--min-tissue", type=float, default=d.min_tissue,
                        help=f"keep tiles whose tissue fraction is at least this "
                             f"(default {d.min_tissue:g})")


def tiling_from_args(args: argparse.Namespace, tile_size: int | None = None,
                     target_mpp: float | None = None) -> TilingParams:
    """The TilingParams of `add_tiling_arguments`' flags (ConfigError when out of range);
    `tile_size`, `target_mpp`: what the model states, for flags left at None."""
    size = args.tile_size if args.tile_size is not None else tile_size
    mpp = args.target_mpp if args.target_mpp is not None else target_mpp
    return TilingParams(tile_size=DEFAULT_TILING.tile_size if size is None else size,
                        target_mpp=DEFAULT_TILING.target_mpp if mpp is None else mpp,
                        min_tissue=args.min_tissue)


def add_tissue_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tissue NAME=VALUE` (repeatable): the tissue mask's settings (core.tiling.TissueParams),
    which then travel with the features, the fit run and the bundle to serving."""
    names = ", ".join(TissueParams().to_dict())
    parser.add_argument("--tissue", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a tissue-mask setting other than its default (repeat; one of {names})")


def tissue_from_args(args: argparse.Namespace) -> TissueParams:
    return TissueParams().with_overrides(args.tissue)


def add_fallback_mpp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fallback-mpp", type=float, default=None,
                        help=f"pixel size (um/px) of the slides whose metadata has none (a row "
                             f"'slide,mpp' in {MPP_CSV} beside the slides gives one per slide); "
                             f"without either, such a slide is refused")
