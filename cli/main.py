"""`prefix-rft`: the trainer, the service on this machine, and a client of its REST API.

prefix-rft train | eval | data validate | models      the trainer, locally (cli/trainer_commands.py)
prefix-rft serve | model-server | init | keys create  the service (cli/service_commands.py)
prefix-rft files | jobs ...                          the REST API's client (cli/client_commands.py)
"""

from __future__ import annotations

import argparse
import logging
import sys

from cli import client_commands, service_commands, trainer_commands
from core.errors import InvalidInput


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-rft", description="Prefix-RFT fine-tuning: trainer and service"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (trainer_commands, service_commands, client_commands):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the client's own lines say what happened
    try:
        return args.handler(args)
    except (InvalidInput, FileNotFoundError) as exc:  # what the user gave: config, data, model, files
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
