"""A small sub-command dispatcher shared by `milroi-train` and `milroi-serve`.

Each sub-command lives in its own module, which exposes `configure_parser(parser)` and
`run(args) -> int`. Only the module of the command being run is imported, so `milroi-train tiles`
starts without importing torch and `milroi-serve --help` without onnxruntime.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Mapping, Sequence

from wsi.errors import WsiError


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
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=commands[name][1])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    module.configure_parser(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(module.run(args) or 0)
    except WsiError as exc:  # a bad slide or parameter: one clear line, no traceback
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
    parser.add_argument("--ray-num-cpus", type=float, default=1, help="with --ray: CPUs per actor (1)")
    parser.add_argument("--ray-num-gpus", type=float, default=0,
                        help="with --ray: GPUs per actor (default 0; 1 on a GPU cluster)")
    parser.add_argument("--ray-max-restarts", type=int, default=2,
                        help="with --ray: restarts of a dead actor, each re-running its slide (2)")
