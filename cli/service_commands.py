"""The service on this machine: `serve`, `model-server`, `init` and `keys create`.

Each handler imports what it runs only when it runs: the API image has no torch, yet runs
`prefix-rft init` and `prefix-rft keys create`.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="run the API and a worker on this machine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="no worker (workers run elsewhere)")
    serve.add_argument(
        "--no-model-server",
        action="store_true",
        help="no model server (PREFIX_RFT_INFERENCE_URL is elsewhere)",
    )
    serve.set_defaults(handler=_serve)

    model_server = commands.add_parser(
        "model-server", help="the model server: OpenAI-compatible inference the API forwards to"
    )
    model_server.add_argument("--host", default="127.0.0.1")
    model_server.add_argument("--port", type=int, default=8001)
    model_server.set_defaults(handler=_model_server)

    commands.add_parser(
        "init", help="migrate the database to head and create the storage bucket"
    ).set_defaults(handler=_init)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create an API key (the project is created if missing)")
    create.add_argument("--project", required=True)
    create.add_argument("--name", default="default", help="a label for the key")
    create.set_defaults(handler=_create_key)


def _serve(args: argparse.Namespace) -> int:
    from cli.launcher import serve

    return serve(
        args.host, args.port, with_worker=not args.no_worker, with_model_server=not args.no_model_server
    )


def _model_server(args: argparse.Namespace) -> int:
    import uvicorn

    from inference.server import create_model_server
    from service.settings import get_settings

    settings = get_settings()
    uvicorn.run(
        create_model_server(settings), host=args.host, port=args.port, log_level=settings.log_level.lower()
    )
    return 0


def _init(_args: argparse.Namespace) -> int:
    from cli.launcher import initialise
    from service.settings import get_settings

    initialise(get_settings())
    print("database migrated to head; storage ready")
    return 0


def _create_key(args: argparse.Namespace) -> int:
    from service.db import make_engine, make_sessionmaker, transaction
    from service.keys import create_key
    from service.settings import get_settings

    engine = make_engine(get_settings().database_url)
    with transaction(make_sessionmaker(engine)) as session:
        project, key = create_key(session, args.project, args.name)
    engine.dispose()
    print(f"project {project.name} ({project.id})", file=sys.stderr)
    print("API key (shown once; store it now):", file=sys.stderr)
    print(key)
    return 0
