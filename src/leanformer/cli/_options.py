"""Config-backed CLI options: one table maps each flag to a config field, its type and its help."""

from __future__ import annotations

import argparse

# flag -> (config field, type, help)
OptionTable = dict[str | tuple[str, ...], tuple[str, type, str]]  # a flag, or the flag and its aliases


def add_config_options(parser: argparse.ArgumentParser, options: OptionTable, defaults: object) -> None:
    """One flag per table entry; unset flags stay absent from the namespace, so the config's defaults rule.

    The help shows the default read from ``defaults`` (a config instance), the one source of truth.
    """
    for flags, (name, kind, text) in options.items():
        flags = (flags,) if isinstance(flags, str) else flags
        default = getattr(defaults, name)
        parser.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS,
                            metavar=flags[0].lstrip("-").upper().replace("-", "_"),  # the flag's name, not the field's
                            help=text if default is None else f"{text} (default: {default})")


def given_options(args: argparse.Namespace, options: OptionTable) -> dict:
    """The config fields the user set on the command line, by field name."""
    return {name: getattr(args, name) for name, _, _ in options.values() if hasattr(args, name)}


def check_positive(*flags: tuple[str, int | None]) -> None:
    """ValueError naming the first (flag, value) pair whose value is given and not a positive integer."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value}: expected a positive integer")
