"""What the benchmark scripts share: their command line and how they load a TOML config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fed_adapters.configuration import ConfigError


def parse_args(doc: str, example: str, argv: list[str] | None, *extra: tuple[str, dict]) -> argparse.Namespace:
    """`CONFIG [--set KEY=VALUE ...]` plus the script's own options (name, argparse keywords)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("config", help=f"TOML file, e.g. {example}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    for name, options in extra:
        parser.add_argument(name, **options)
    return parser.parse_args(argv)


def load_or_explain(load: Any, args: argparse.Namespace) -> Any | None:
    """The loaded config, or None after printing the config error in one line (the caller exits 2)."""
    try:
        return load(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def output_dir(directory: Path, resolved_config_toml: str) -> Path:
    """The benchmark's result directory, with the resolved config written first (results go beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(resolved_config_toml)
    return directory


def select(requested: str | None, known: list[str], what: str) -> list[str] | None:
    """The comma-separated names in `requested` (all of `known` when None); None after explaining unknown ones."""
    if requested is None:
        return list(known)
    wanted = requested.split(",")
    unknown = [n for n in wanted if n not in known]
    if unknown:
        print(f"error: unknown {what}(s) {unknown}; choose from {', '.join(known)}", file=sys.stderr)
        return None
    return wanted
