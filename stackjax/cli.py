"""The `stackjax` command line."""

import argparse
import platform
import sys

from ._version import __version__


def _info(args: argparse.Namespace) -> int:
    import jax

    print(f"stackjax {__version__}")
    print(f"python   {platform.python_version()}")
    print(f"jax      {jax.__version__} (backend: {jax.default_backend()})")
    print(f"devices  {', '.join(str(d) for d in jax.devices())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackjax",
        description="Differentiable Stackelberg games in JAX, for governing LLM agents' token spend.",
    )
    parser.add_argument("--version", action="version", version=f"stackjax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="print versions and the JAX devices in use")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
