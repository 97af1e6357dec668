"""One module per CLI subcommand; see :mod:`volumefusion.cli`."""

import argparse


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count of processes, say)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be 1 or more")
    return value


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set`` for commands that take a :class:`~volumefusion.config.Config`."""
    parser.add_argument("--config", "-c", action="append", default=[], metavar="YAML",
                        help="config file(s), applied in order over the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, e.g. --set optim.lr=3e-4 (repeatable; "
                             "`volumefusion config --fields` lists them)")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The settings changed most often, as plain flags on every training command."""
    add_config_args(parser)
    g = parser.add_argument_group("common settings (shortcuts for --set)")
    g.add_argument("--max-steps", type=int, help="optimiser steps (run.max_steps)")
    g.add_argument("--batch-size", type=int, help="samples per process per micro-batch (run.batch_size)")
    g.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (run.device)")
    g.add_argument("--seed", type=int, help="seed of every random draw (run.seed)")
    g.add_argument("--workers", type=int, help="loader worker processes per training process (data.workers)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from OUT/checkpoints/latest.pt (or CKPT) if it exists")


def training_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` strings for the shortcut flags that were given (they win over --set)."""
    fields = {"max_steps": "run.max_steps", "batch_size": "run.batch_size", "lr": "optim.lr",
              "device": "run.device", "seed": "run.seed", "workers": "data.workers"}
    out = list(args.overrides)
    for attr, key in fields.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out
