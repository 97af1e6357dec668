"""One module per CLI subcommand; see :mod:`volumefusion.cli`."""

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--set`` for commands that take a :class:`~volumefusion.config.Config`."""
    parser.add_argument("--config", "-c", action="append", default=[], metavar="YAML",
                        help="config file(s), applied in order over the defaults")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one field, e.g. --set optim.lr=3e-4 (repeatable; "
                             "`volumefusion config --fields` lists them)")
