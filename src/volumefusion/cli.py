"""The ``volumefusion`` (alias ``vf``) command line.

Each subcommand lives in ``volumefusion/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func``. Command modules import heavy dependencies inside ``func``
so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from volumefusion import VolumeFusionError, __version__
from volumefusion.log import setup

COMMANDS = ["demo", "prepare", "pretrain", "finetune", "probe", "predict", "evaluate", "show", "convert", "export",
            "config"]

DESCRIPTION = """\
Volume Fusion self-supervised pretraining of PCT-Net for 3D CT segmentation (MIS-FM),
with fine-tuning, sliding-window prediction and evaluation.

Typical pipeline:
  volumefusion prepare  /data/ct/ --out store/            # raw CT -> chunked int16 store
  volumefusion pretrain --data store/ --out runs/vf       # Volume Fusion pretraining
  volumefusion probe    runs/vf/checkpoints/latest.pt --data Task09_Spleen/ --out probe/  # features vs random
  volumefusion finetune --data Task09_Spleen/ --pretrained runs/vf/checkpoints/latest.pt --out runs/ft
  volumefusion predict  -m runs/ft/checkpoints/best.pt -i images/ -o preds/
  volumefusion evaluate --pred preds/ --gt labels/ --out metrics.csv
  volumefusion demo --quick                               # all of it on built-in data, in minutes
"""


def _add_verbosity(parser: argparse.ArgumentParser, top_level: bool) -> None:
    # a sub-command's copy sets nothing unless given, so it never resets what came before the command
    unset = {} if top_level else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more log output (-vv: debug)", **unset)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars",
                        **unset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volumefusion", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"volumefusion {__version__}")
    _add_verbosity(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # -v / -q also after the command name (`volumefusion prepare ... -q`)
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, top_level=False)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])
    for name in COMMANDS:  # a command that fails to import is a bug to see, not a command to leave out
        importlib.import_module(f"volumefusion.commands.{name}").register(sub)
    parser.commands = sub.choices  # {name: its parser}, for errors in the command's own usage
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would answer with the top-level usage; the command's is the helpful one
        command = parser.commands.get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup(-1 if args.quiet else args.verbose or 0)
    try:
        return int(args.func(args) or 0)
    except VolumeFusionError as exc:
        print(f"volumefusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused: a full disk, a file that vanished, permissions
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"volumefusion {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"volumefusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
