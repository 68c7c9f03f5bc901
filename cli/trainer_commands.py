"""The trainer's commands: train, evaluate and inspect, locally, without the service.

prefix-rft train CONFIG.yaml [--resume DIR] [--set training.steps=20 ...]
    (over several processes: torchrun --nproc_per_node N -m cli.main train CONFIG.yaml ...)
prefix-rft eval CONFIG.yaml [--adapter DIR] [--out FILE.jsonl] [--show N]
prefix-rft data validate FILE.jsonl [--model NAME]
prefix-rft models [add PATH [--name NAME] | remove NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from core.config import ConfigError, load_config
from core.data import DEFAULT_MAX_LINE_BYTES, iter_byte_lines, length_stats, read_jsonl


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="run a training job from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument(
        "--resume", type=Path, help="checkpoint directory, or an output_dir to resume its latest"
    )
    train.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field"
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate the base model or an adapter on the held-out split")
    evaluate.add_argument("config", type=Path)
    evaluate.add_argument(
        "--adapter", type=Path, help="a PEFT adapter directory (default: none, the base model)"
    )
    evaluate.add_argument(
        "--out", type=Path, help="where the completions go (default: OUTPUT_DIR/eval_completions.jsonl)"
    )
    evaluate.add_argument("--show", type=int, default=3, help="completions printed (default 3)")
    evaluate.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    evaluate.set_defaults(handler=_eval)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    validate = data_commands.add_parser("validate", help="check a JSONL dataset line by line")
    validate.add_argument("file", type=Path)
    validate.add_argument("--model", help="also report token lengths with this model's tokenizer")
    validate.set_defaults(handler=_validate)

    models = commands.add_parser("models", help="list the base models, or register one")
    models.set_defaults(handler=_models)
    model_commands = models.add_subparsers(dest="models_command")
    add = model_commands.add_parser(
        "add",
        help="register a base model: a local Hugging Face directory, a hub id in the local cache, or a "
        "GGUF file (converted once into the data directory)",
    )
    add.add_argument("path", help="directory, hub id (org/name) or FILE.gguf")
    add.add_argument("--name", help="the name jobs and chat requests use (default: from the path)")
    add.set_defaults(handler=_models_add)
    remove = model_commands.add_parser("remove", help="forget a registered base model (its files stay)")
    remove.add_argument("name")
    remove.set_defaults(handler=_models_remove)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError([f"--set {pair!r}: expected FIELD=VALUE, e.g. training.steps=20"])
        key, value = pair.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _judge():
    """The judges of model graders, as the deployment's settings name them (PREFIX_RFT_JUDGE_MODELS)."""
    from service.judge import ChatJudge
    from service.settings import get_settings

    return ChatJudge(get_settings().judge_models)


def _train(args: argparse.Namespace) -> int:
    """Train; under torchrun or accelerate launch, as one rank of a run over several processes
    (rank 0 prints, reports and writes; the others only warn). A config asking for
    training.processes > 1 outside a launcher starts torchrun on this machine with as many."""
    config = load_config(args.config, _overrides(args.set))
    if (config.training.processes or 1) > 1 and "WORLD_SIZE" not in os.environ:
        return _train_with_torchrun(args, config.training.processes)
    _quiet_libraries()
    from cli.progress import ProgressReporter
    from core.distributed import Ranks
    from core.trainer import Trainer

    ranks = Ranks.from_environment(config.training.device)
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        main = ranks.is_main
        if main:
            processes = f" in {ranks.world_size} processes" if ranks.distributed else ""
            print(
                f"loading {config.model} with a {config.adapter.type} adapter ({config.method}){processes} ...",
                flush=True,
            )
        reporter = ProgressReporter(total_steps=config.training.steps) if main else None
        trainer = Trainer(config, callbacks=[reporter] if reporter else [], judge=_judge(), ranks=ranks)
        if main:
            print(
                f"{len(trainer.train_examples)} training examples "
                f"({sum(1 for e in trainer.train_examples if e.demo_ids)} with demonstrations), "
                f"{len(trainer.eval_examples)} held out; output: {config.output_dir}",
                flush=True,
            )
        result = trainer.train(resume_from=args.resume)
        if reporter is not None:
            reporter.close()
            print(reporter.summary(result))
        return 0 if not result.stopped else 3
    finally:
        ranks.close()


def _train_with_torchrun(args: argparse.Namespace, processes: int) -> int:
    """This train command again, as `processes` ranks that torchrun starts on this machine."""
    command = [str(args.config)]
    if args.resume is not None:
        command += ["--resume", str(args.resume)]
    for pair in args.set:
        command += ["--set", pair]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    return subprocess.call([*launcher, "-m", "cli.main", "train", *command])


def _eval(args: argparse.Namespace) -> int:
    config = load_config(args.config, _overrides(args.set))
    _quiet_libraries()
    from core.trainer import Trainer

    trainer = Trainer(config, judge=_judge())
    if args.adapter is not None:
        trainer.load_adapter(args.adapter)
    evaluation = trainer.evaluation()
    if evaluation is None:
        print("nothing to evaluate: the config has no held-out examples or no reward", file=sys.stderr)
        return 2
    out = args.out or Path(config.output_dir) / "eval_completions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in evaluation.completions), encoding="utf-8")
    for row in evaluation.completions[: args.show]:
        print(f"--- line {row['line']}, reward {row['reward']:g}\n> {row['prompt']}\n{row['completion']}")
    print(json.dumps(evaluation.metrics, indent=2))
    print(f"{len(evaluation.completions)} completions with their scores: {out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        print(f"error: no such file: {args.file}", file=sys.stderr)
        return 2
    report = read_jsonl(iter_byte_lines(args.file), DEFAULT_MAX_LINE_BYTES)
    summary = report.summary()
    if args.model and report.examples:
        _quiet_libraries()
        from core.models import load_base_model
        from core.rollout import encode_example

        _, tokenizer = load_base_model(args.model)
        encoded = [encode_example(tokenizer, e, tokenizer.eos_token_id) for e in report.examples]
        summary["prompt_tokens"] = length_stats([len(e.prompt_ids) for e in encoded])
        summary["demonstration_tokens"] = length_stats([len(e.demo_ids) for e in encoded if e.demo_ids])
    print(json.dumps(summary, indent=2))
    return 0 if report.ok else 1


def _models(_args: argparse.Namespace) -> int:
    from core.base_models import list_models, untrainable_reason

    for info in list_models():
        size = f"{info.parameters / 1e6:.1f}M params, {info.context_length} tokens"
        template = "chat template" if info.chat_template else "NO chat template"
        print(f"{info.name:24s} {size:30s} {template:17s} {info.description}")
        if reason := untrainable_reason(info):
            print(f"{'':24s} cannot train: {reason}")
    print(
        "(prefix-rft models add PATH [--name NAME] registers a local directory, cached hub id or GGUF file)"
    )
    return 0


def _models_add(args: argparse.Namespace) -> int:
    from core.base_models import check_name, data_dir, default_model_name, register_model

    source, name = args.path, check_name(args.name or default_model_name(args.path))
    gguf = Path(source).expanduser()
    if gguf.suffix == ".gguf" and gguf.is_file():
        # transformers will not train a GGUF-loaded model: convert once, as SmolLM2 is, and
        # register the converted directory.
        _quiet_libraries()
        from core.models import convert_gguf

        # Under models/gguf/: no name can land on the registry file or a built-in model's directory.
        target = data_dir() / "models" / "gguf" / name
        stamp_file, stamp = target / "converted-from.json", _file_stamp(gguf)
        if not (target / "config.json").is_file() or _read_stamp(stamp_file) != stamp:
            # A conversion of another file (or of this one before it changed) is not reused.
            shutil.rmtree(target, ignore_errors=True)
            print(f"converting {gguf} into {target} (once)")
            convert_gguf(gguf.parent, gguf.name, target)
            stamp_file.write_text(json.dumps(stamp))
        source = str(target)
    info = register_model(source, name)
    print(
        f"registered {info.name}: {info.architecture}, {info.parameters / 1e6:.1f}M params, "
        f"{info.context_length} tokens of context, chat template, at {info.path}"
    )
    return 0


def _file_stamp(file: Path) -> dict:
    stat = file.stat()
    return {"file": str(file.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_stamp(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _models_remove(args: argparse.Namespace) -> int:
    from core.base_models import unregister_model

    if not unregister_model(args.name):
        print(
            f"error: no registered model is called {args.name!r} (prefix-rft models lists them)",
            file=sys.stderr,
        )
        return 2
    print(f"removed {args.name}")
    return 0
