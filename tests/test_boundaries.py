"""The architecture's boundaries, read from the code (ast) and, where it matters at run time, from
the modules a fresh interpreter loads.

Imports flow one way: core <- service <- api / worker / inference <- cli. protocol/ is what the
two HTTP servers share; migrations/ runs against service's tables. A new top-level package must
get a row in ALLOWED before anything passes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {
    "core",
    "service",
    "protocol",
    "api",
    "worker",
    "inference",
    "migrations",
    "cli",
    "benchmarks",
    "examples",
    "tests",
}

# Which of our packages each package may import.
ALLOWED: dict[str, set[str]] = {
    "core": set(),  # the trainer: a library that knows nothing of the rest
    "service": {"core"},  # settings, database, storage, queue, job lifecycle
    "protocol": set(),  # the HTTP pieces both servers share
    "api": {"core", "service", "protocol"},
    "worker": {"core", "service"},
    "inference": {"core", "service", "protocol"},
    "migrations": {"service"},
    "cli": OURS - {"cli", "benchmarks", "examples", "tests"},  # the entry: wires everything together
    "benchmarks": OURS - {"benchmarks", "tests"},
    "examples": set(),
    "tests": OURS - {"tests"},
}

# Libraries a package must not name: the trainer has no web, database or queue; the servers'
# shared pieces and the service layer know no model code; the service layer knows no HTTP framework.
WEB_DB_QUEUE = {
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "sqlalchemy",
    "alembic",
    "celery",
    "kombu",
    "redis",
}
MODEL_CODE = {"torch", "transformers", "peft", "accelerate", "safetensors"}
FORBIDDEN: dict[str, set[str]] = {
    "core": WEB_DB_QUEUE | {"boto3", "botocore"},
    "service": MODEL_CODE | {"fastapi", "starlette", "uvicorn"},
    "protocol": MODEL_CODE | {"sqlalchemy", "celery"},
    "api": MODEL_CODE,
}


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative ones resolved."""
    package = list(path.relative_to(root).parts[:-1])  # of a module, and of an __init__.py alike
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, node.module or ""))
    return found


def top_level_packages(root: Path) -> set[str]:
    """Every folder at the top that holds Python code (hidden ones, like .venv, aside)."""
    return {
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))
    }


def boundary_violations(root: Path) -> list[str]:
    """Each import that crosses a boundary, as `file:line imports module (why)`."""
    problems = []
    for package in sorted(top_level_packages(root)):
        if package not in ALLOWED:
            problems.append(f"{package}/ is a top-level package without a row in ALLOWED")
            continue
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root)
            in_routes = where.parts[:2] == ("api", "routes") and where.name != "__init__.py"
            for line, module in imports_of(path, root):
                top = module.split(".")[0]
                if top in OURS and top != package and top not in ALLOWED[package]:
                    problems.append(f"{where}:{line} imports {module} ({package} may not import {top})")
                if top in FORBIDDEN.get(package, set()):
                    problems.append(f"{where}:{line} imports {module} ({package} must not use {top})")
                if in_routes and module.startswith("api.routes."):
                    problems.append(f"{where}:{line} imports {module} (routes do not import routes)")
    return problems


def test_imports_flow_one_way():
    problems = boundary_violations(ROOT)
    assert not problems, "\n".join(problems)


def test_every_top_level_package_has_a_row():
    assert top_level_packages(ROOT) <= set(ALLOWED), top_level_packages(ROOT) - set(ALLOWED)


def test_a_back_edge_is_named_by_file_and_line(tmp_path):
    files = {
        "core/__init__.py": "",
        "core/trainer.py": "import torch\nfrom service.db import make_engine\n",
        "service/__init__.py": "",
        "service/db.py": "from .tables import Base\nimport fastapi\n",
        "service/tables.py": "",
        "api/__init__.py": "",
        "api/routes/__init__.py": "",
        "api/routes/jobs.py": "from api.routes.rewards import joined\nfrom inference import engine\n",
        "api/routes/rewards.py": "from ..errors import APIError\n",
        "api/errors.py": "",
        "newpkg/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert boundary_violations(tmp_path) == [
        "api/routes/jobs.py:1 imports api.routes.rewards (routes do not import routes)",
        "api/routes/jobs.py:2 imports inference (api may not import inference)",
        "core/trainer.py:2 imports service.db (core may not import service)",
        "newpkg/ is a top-level package without a row in ALLOWED",
        "service/db.py:2 imports fastapi (service must not use fastapi)",
    ]


def test_relative_imports_resolve_to_their_package(tmp_path):
    (tmp_path / "api" / "routes").mkdir(parents=True)
    source = tmp_path / "api" / "routes" / "jobs.py"
    source.write_text("from ..errors import APIError\nfrom . import models\nfrom .models import x\n")
    assert imports_of(source, tmp_path) == [(1, "api.errors"), (2, "api.routes"), (3, "api.routes.models")]


# ----- at run time ------------------------------------------------------------------------------


def modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_the_trainer_loads_nothing_of_the_web_database_or_queue_layers():
    loaded = tops(modules_loaded_by("import core.trainer"))
    assert not loaded & (WEB_DB_QUEUE | OURS - {"core"}), loaded & (WEB_DB_QUEUE | OURS - {"core"})


def test_config_data_and_rewards_load_without_torch():
    # The API validates job specs, datasets and reward specs with these; its image has no torch.
    loaded = tops(modules_loaded_by("import core.config, core.data, core.rewards"))
    assert not loaded & MODEL_CODE, loaded & MODEL_CODE


def test_the_api_process_never_imports_torch(tmp_path):
    # The API image has no torch: building the app, listing models, uploading, estimating and
    # creating a job must not need it.
    loaded = modules_loaded_by(
        f"import os; os.environ['PREFIX_RFT_DATA_DIR'] = {str(tmp_path)!r}; "
        "from fastapi.testclient import TestClient; from api.app import create_app; "
        "from cli.launcher import initialise; from service.settings import Settings; "
        "s = Settings(); initialise(s); c = TestClient(create_app(s)); "
        "from service.db import make_engine, make_sessionmaker, transaction; from service.keys import create_key; "
        "t = transaction(make_sessionmaker(make_engine(s.database_url))); session = t.__enter__(); "
        "key = create_key(session, 'p')[1]; t.__exit__(None, None, None); "
        "c.headers['Authorization'] = 'Bearer ' + key; assert c.get('/v1/models').status_code == 200; "
        "f = c.post('/v1/files', files={'file': ('a.jsonl', b'{\"prompt\": \"x\", \"demonstration\": \"y\"}\\n' * 8)}, "
        "data={'purpose': 'fine-tune'}).json()['id']; "
        "body = {'model': 'tiny-random', 'training_file': f}; "
        "assert c.post('/v1/fine_tuning/estimates', json=body).status_code == 200; "
        "assert c.post('/v1/fine_tuning/jobs', json=body).status_code == 200"
    )
    assert "api.app" in loaded
    assert not tops(loaded) & MODEL_CODE, tops(loaded) & MODEL_CODE


def test_the_command_line_starts_without_torch():
    # The API image runs `prefix-rft init` and `prefix-rft keys create`: the parser must not need torch.
    loaded = tops(modules_loaded_by("from cli.main import build_parser; build_parser()"))
    assert not loaded & MODEL_CODE, loaded & MODEL_CODE


def test_celery_tasks_take_ids_and_stay_thin():
    tree = ast.parse((ROOT / "worker" / "tasks.py").read_text())
    tasks = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert tasks
    for task in tasks:
        assert all(a.annotation is not None and ast.unparse(a.annotation) == "str" for a in task.args.args), (
            task.name
        )
        assert len(task.body) <= 3, f"{task.name} should call domain code, not hold it"
