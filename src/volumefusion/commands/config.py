"""``volumefusion config``: print the resolved configuration or the list of fields."""

from __future__ import annotations

import argparse

from volumefusion.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "config", help="show the resolved configuration or every config field",
        description="Print the configuration that results from the defaults, --config files and --set "
                    "overrides, as YAML; or, with --fields, every field with its default and meaning.\n\n"
                    "example: volumefusion config -c configs/pretrain_paper.yaml --set optim.lr=3e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its default and help")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from volumefusion import config

    if args.fields:
        print(config.describe_fields())
        return 0
    cfg = config.load(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
