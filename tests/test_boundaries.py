"""The architecture's boundaries, enforced: each import runs in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# boto3 is not listed: accelerate imports it on its own whenever it is installed.
SERVICE_LAYERS = {
    "api",
    "worker",
    "service",
    "fastapi",
    "starlette",
    "sqlalchemy",
    "alembic",
    "celery",
    "kombu",
    "redis",
}


def modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_trainer_imports_nothing_of_the_web_database_or_queue_layers():
    loaded = modules_loaded_by("import core.trainer, core.cli, core.progress")
    assert not loaded & SERVICE_LAYERS, loaded & SERVICE_LAYERS


def test_core_source_never_names_the_service_layers():
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in SERVICE_LAYERS, f"{path.relative_to(ROOT)} imports {name}"


def test_config_data_and_rewards_load_without_torch():
    # The API validates job specs, datasets and reward specs with these; its image has no torch.
    loaded = modules_loaded_by("import core.config, core.data, core.rewards")
    assert "torch" not in loaded and "transformers" not in loaded


def test_the_api_process_never_imports_torch(tmp_path):
    # The API image has no torch: building the app and answering a request must not need it.
    loaded = modules_loaded_by(
        f"import os; os.environ['PREFIX_RFT_DATA_DIR'] = {str(tmp_path)!r}; "
        "from fastapi.testclient import TestClient; from api.app import create_app; "
        "from service.server import initialise; from service.settings import Settings; "
        "s = Settings(); initialise(s); TestClient(create_app(s)).get('/v1/models')"
    )
    assert "api" in loaded
    assert not loaded & {"torch", "transformers", "peft", "core.trainer"}, loaded & {
        "torch",
        "transformers",
        "peft",
    }


def test_celery_tasks_take_ids_and_stay_thin():
    tree = ast.parse((ROOT / "worker" / "tasks.py").read_text())
    tasks = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert tasks
    for task in tasks:
        assert all(a.annotation is not None and ast.unparse(a.annotation) == "str" for a in task.args.args), (
            task.name
        )
        assert len(task.body) <= 3, f"{task.name} should call domain code, not hold it"
