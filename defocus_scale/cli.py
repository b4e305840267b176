"""The ``defocus-scale`` console command.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from defocus_scale import demo
    from defocus_scale.analysis import cli as analysis_cli
    from defocus_scale.data import make_shards
    from defocus_scale.data import manifest as shard_manifest
    from defocus_scale.evaluate import cli as eval_cli
    from defocus_scale.orchestration import cli as launch_cli
    from defocus_scale.scaling import cli as sweep_cli
    from defocus_scale.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="defocus-scale", description="Pretraining system for De-focus Attention Networks."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(subparsers)
    make_shards.register(subparsers)
    shard_manifest.register(subparsers)  # index-shards
    analysis_cli.register(subparsers)
    launch_cli.register(subparsers)
    train_cli.register(subparsers)
    sweep_cli.register(subparsers)
    eval_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
