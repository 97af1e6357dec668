"""``volumefusion config``: print the resolved configuration or the list of fields."""

from __future__ import annotations

import argparse

from volumefusion.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser(
        "config", help="show the resolved configuration or every config field",
        description="Print the configuration that results from the defaults, --config files and --set "
                    "overrides, as YAML; with --fields, every field with its default and meaning; with "
                    "--presets, the bundled presets (give one to -c by name).\n\n"
                    "example: volumefusion config -c pretrain_paper --set optim.lr=3e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--fields", action="store_true", help="list every field with its default and help")
    p.add_argument("--presets", action="store_true", help="list the bundled presets and where they are")
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from volumefusion import config

    if args.fields:
        print(config.describe_fields())
        return 0
    if args.presets:
        for name in config.presets():
            path = config.PRESETS / (name + ".yaml")
            command = None if config.is_run_config(config.read_yaml(path)) else config.declared_command(path)
            note = f"  (for `{command} -c`)" if command else ""
            print(f"{name:16s} {path}{note}")
        return 0
    cfg = config.load(args.config, args.overrides)
    from volumefusion.train.runs import check_model_settings  # imports torch: not for --fields / --presets

    check_model_settings(cfg)  # what training would refuse (crop vs down-sampling), refused here too
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
