"""Command lines made from config dataclasses: one ``--field-name`` flag per field, its default the
field's, its --help the string literal written under the field (the house style of config docs).

    parser = dataclass_parser(TrainConfig, "Train the world model.")
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))

bool fields become ``--flag / --no-flag``; other fields take the type of their default. Used by the
scripts run as ``python -m`` (world training, world GRPO); the ``spiral-rt`` command has its own
hand-written parser. Boundaries: argparse only; the dataclass validates its values.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import fields


def field_docs(cls) -> dict[str, str]:
    """Per-field docstrings of a dataclass (the string literal after each field); {} without source."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError, SyntaxError):  # source unavailable (zipped install): no per-flag help
        return {}
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def dataclass_parser(cls, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with a flag per field of ``cls`` and ``--log-level``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    docs = field_docs(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=docs.get(f.name, ""))
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=docs.get(f.name, ""))
    parser.add_argument("--log-level", default="INFO", help="logging level")
    return parser


def config_from_args(cls, args: argparse.Namespace):
    """``cls`` built from the parsed flags."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
