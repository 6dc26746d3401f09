"""`xlaserve pull [ALIAS]`: fetch a model into the model cache and print its path (idempotent)."""

from __future__ import annotations

from xlaserve.checkpoints import registry


def cmd_pull(args) -> int:
    print(registry.pull(args.alias))
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="fetch a model into the model cache")
    p.add_argument("alias", nargs="?", default=registry.DEFAULT_MODEL, choices=sorted(registry.ALIASES))
    p.set_defaults(func=cmd_pull)
