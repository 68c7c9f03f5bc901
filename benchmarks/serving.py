"""Serving many prefix adapters at once (the model server) vs one by one with PEFT `generate`.

    python -m benchmarks.serving --out docs/benchmarks/serving.json

SmolLM2-135M-Instruct (CPU; `--dtype`, default auto: bfloat16 on AMX / AVX512-BF16 CPUs, for both
runs), 16 chat requests spread over 4 prefix adapters of different
lengths (8, 12, 16, 20 virtual tokens, each initialised from the chat template's activations and
then perturbed, so every adapter decodes differently), greedy, 64 new tokens at most (a row also
stops at EOS). The baseline is what one would write without the server: one `PeftModel`, each
adapter loaded with `load_adapter`, and `generate` per request, one after the other, in this
process. Then `prefix-rft model-server` runs in its own process, with the adapters in object
storage (a local directory), and the 16 requests are sent to it at once, streamed, from 16
threads. Adapter and model loading are not timed (one warm-up request per adapter first).
Throughput is completion tokens / wall time; time to first token (TTFT) is counted from the
moment all 16 requests arrived, so a request served later in the baseline waits for those
before it. Outputs are compared as text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import spread

log = logging.getLogger("benchmarks.serving")

MODEL = "smollm2-135m-instruct"
PREFIX_LENGTHS = (8, 12, 16, 20)
TARGET_SPEEDUP = 3.0
TARGET_VS_LLAMA_CPP = 3.0  # tokens/s, the base model on both servers
QUESTIONS = (
    "What is 17 + 25?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain what a prime number is.",
    "Give me a tip for learning to code.",
    "What is 9 times 7?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
    "What does a compiler do?",
    "List two fruits that are red.",
    "How many days are in a leap year?",
    "Translate 'good morning' into French.",
    "What is the boiling point of water in Celsius?",
    "Tell me a fun fact about octopuses.",
)


def make_adapters(directory: Path, noise: float, seed: int) -> list[Path]:
    """Prefix adapters of different lengths, perturbed so that each one decodes differently."""
    import torch

    from core.adapters import attach_adapter, export_adapter
    from core.config import PrefixAdapterConfig
    from core.models import load_base_model

    paths = []
    generator = torch.Generator().manual_seed(seed)
    for i, n in enumerate(PREFIX_LENGTHS):
        model, tokenizer = load_base_model(MODEL)
        policy = attach_adapter(model, tokenizer, PrefixAdapterConfig(num_virtual_tokens=n))
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
        paths.append(export_adapter(policy, directory / f"adapter-{i}", MODEL))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request at most")
    parser.add_argument("--requests", type=int, default=16, help="chat requests (round-robin over adapters)")
    parser.add_argument("--noise", type=float, default=0.1, help="adapter perturbation, in parameter stds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="runs of both ways, alternating")
    parser.add_argument(
        "--no-peer",
        dest="peer",
        action="store_false",
        help="skip the base model against llama.cpp's llama-server (built on first use, ~10 min)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import peft
    import torch
    import transformers
    from peft import PeftModel

    from benchmarks.provenance import provenance, write_report
    from core.models import load_base_model, resolve_dtype
    from core.rollout import stop_token_ids

    dtype = resolve_dtype(args.dtype)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(Path(tmp), args.noise, args.seed)
        model, tokenizer = load_base_model(MODEL, dtype=dtype)
        eos = sorted(stop_token_ids(model, tokenizer))
        prompts = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            )
            for i in range(args.requests)
        ]
        which = [i % len(adapter_dirs) for i in range(args.requests)]

        # Sequential baseline: one PeftModel holding every adapter, `generate` per request.
        names = [f"adapter-{i}" for i in range(len(adapter_dirs))]
        peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
        for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
            peft_model.load_adapter(directory, adapter_name=name)
        peft_model.eval()

        class FirstToken:
            """A `generate` streamer that notes when the first new token came (the prompt comes first)."""

            def __init__(self) -> None:
                self.calls, self.at = 0, None

            def put(self, _value) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.at = time.perf_counter()

            def end(self) -> None:
                pass

        def one_by_one(
            indices: list[int], arrived: float | None = None
        ) -> tuple[list[list[int]], list[float]]:
            """Each request's tokens, and its time to first token counted from `arrived` (all came then)."""
            outputs, ttft = [], []
            for i in indices:
                streamer = FirstToken()
                peft_model.set_adapter(names[which[i]])
                ids = torch.tensor([prompts[i]])
                with torch.inference_mode():
                    out = peft_model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=args.max_tokens,
                        do_sample=False,
                        eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer,
                    )
                outputs.append(out[0, len(prompts[i]) :].tolist())
                ttft.append((streamer.at or time.perf_counter()) - (arrived or 0))
            return outputs, ttft

        one_by_one([0])  # warm-up
        runs = []
        for repeat in range(args.repeats):  # the two ways alternate, so a slow spell hits both
            log.info("run %d/%d", repeat + 1, args.repeats)
            started = time.perf_counter()
            sequential, sequential_ttft = one_by_one(list(range(args.requests)), started)
            sequential_s = time.perf_counter() - started
            # The model server: the same requests sent at once, streamed, adapters from storage.
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in sequential]
            served, served_ttft, served_s, steps = serve_concurrently(Path(tmp), adapter_dirs, which, args)
            runs.append(
                {
                    "sequential": run_summary(sum(len(t) for t in sequential), sequential_s, sequential_ttft),
                    "model_server": {
                        **run_summary(sum(r["completion_tokens"] for r in served), served_s, served_ttft),
                        "decode_steps": steps,
                    },
                }
            )
            runs[-1]["speedup"] = round(
                runs[-1]["model_server"]["tokens_per_s"] / runs[-1]["sequential"]["tokens_per_s"], 2
            )

        peer = against_llama_cpp(Path(tmp), args) if args.peer else None

    mismatched = [i for i, (want, got) in enumerate(zip(texts, served, strict=True)) if want != got["text"]]
    sequential_figures = medians([run["sequential"] for run in runs])
    served_figures = medians([run["model_server"] for run in runs])
    sequential_tokens, served_tokens = runs[-1]["sequential"]["tokens"], runs[-1]["model_server"]["tokens"]
    sequential_s, served_s = sequential_figures["seconds"]["median"], served_figures["seconds"]["median"]
    sequential_tps = sequential_figures["tokens_per_s"]["median"]
    served_tps = served_figures["tokens_per_s"]["median"]
    speedup = statistics.median(run["speedup"] for run in runs)
    command = "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "benchmark": "serving",
        **provenance(command, args.out),
        "model": MODEL,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "ld_preload": os.environ.get("LD_PRELOAD"),  # the C allocator of both runs, if preloaded
        "requests": args.requests,
        "adapters": len(adapter_dirs),
        "prefix_lengths": list(PREFIX_LENGTHS),
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "repeats": args.repeats,
        # Medians over the repeats, with the range; each run's own figures are in `runs`.
        "sequential": sequential_figures,
        "model_server": served_figures,
        "speedup": round(speedup, 2),
        "runs": runs,
        "base_model_vs_llama_cpp": peer,
        "target_speedup": TARGET_SPEEDUP,
        "identical_outputs": not mismatched,
        "mismatched_requests": mismatched,
        "finish_reasons": {r: sum(x["finish_reason"] == r for x in served) for r in ("stop", "length")},
        "distinct_outputs": len({x["text"] for x in served}),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        # Other work on the same cores slows both runs (the longer sequential one more): check these.
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    log.info("%-22s %12s %12s", "", "one by one", "model server")
    log.info("%-22s %12d %12d", "completion tokens", sequential_tokens, served_tokens)
    log.info("%-22s %12.2f %12.2f", "seconds", sequential_s, served_s)
    log.info("%-22s %12.2f %12.2f", "tokens/s", sequential_tps, served_tps)
    for q in (50, 99):
        log.info(
            "%-22s %12.3f %12.3f",
            f"TTFT p{q} (s)",
            result["sequential"][f"ttft_p{q}_s"]["median"],
            result["model_server"][f"ttft_p{q}_s"]["median"],
        )
    log.info(
        "medians of %d runs; speedup %.2fx (target %.1fx); identical outputs (last run): %s",
        args.repeats,
        speedup,
        TARGET_SPEEDUP,
        not mismatched,
    )
    if peer is not None:
        log.info(
            "base model, medians of %d: model server %.2f tokens/s (TTFT p50 %.3f s), llama.cpp %.2f "
            "(TTFT p50 %.3f s): %.2fx (target %.1fx); %d of %d outputs identical",
            args.repeats,
            peer["model_server"]["tokens_per_s"]["median"],
            peer["model_server"]["ttft_p50_s"]["median"],
            peer["llama_cpp"]["tokens_per_s"]["median"],
            peer["llama_cpp"]["ttft_p50_s"]["median"],
            peer["speedup"],
            TARGET_VS_LLAMA_CPP,
            peer["identical_outputs"],
            args.requests,
        )
    if args.out is not None:
        write_report(args.out, result)
    return 0


def medians(summaries: list[dict]) -> dict[str, dict[str, float]]:
    """Median and range over the runs of each figure of their `run_summary`s."""
    return {key: spread(s[key] for s in summaries) for key in summaries[0] if key != "tokens"}


def run_summary(tokens: int, seconds: float, ttft: list[float]) -> dict[str, float]:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def start_model_server(tmp: Path, args):
    """`prefix-rft model-server` on a free port, objects under tmp; returns (process, url, log path)."""
    import subprocess

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFIX_RFT_STORAGE_URL": (tmp / "objects").as_uri(),
        "PREFIX_RFT_INFERENCE_DTYPE": args.dtype,
    }
    log_path = tmp / "model-server.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "model-server", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(log_path.read_text()[-3000:])
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chat_request(i: int, args, model: str) -> dict:
    """Request i of the benchmark, as an OpenAI client sends it (streamed, with usage)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def unstreamed(request: dict) -> dict:
    """The same request, answered whole (for warm-ups)."""
    return {**{k: v for k, v in request.items() if k != "stream_options"}, "stream": False}


def stream_all(url: str, bodies: list[dict]) -> tuple[list[dict], float]:
    """POST every body to url/v1/chat/completions at once, streamed, from one thread each.

    Returns each answer (text, time to first token from the common start, completion tokens,
    finish reason) and the wall time until the last one ended.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    # One client for all threads, made before the clock starts (a client per request would
    # time the building of 16 SSL contexts on the machine that decodes).
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    http = httpx.Client(base_url=url, timeout=600, limits=limits)
    gate = threading.Barrier(len(bodies) + 1)
    started = [0.0]

    def ask(body: dict) -> dict:
        gate.wait()
        text, first, usage, finish = "", None, None, None
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                for choice in chunk["choices"]:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        text += choice["delta"]["content"]
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
        if usage is None:
            raise RuntimeError(f"{url} sent no usage chunk")
        return {
            "text": text,
            "ttft": (first or time.perf_counter()) - started[0],
            "completion_tokens": usage["completion_tokens"],
            "finish_reason": finish,
        }

    with http, ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(ask, body) for body in bodies]
        gate.wait()
        started[0] = time.perf_counter()
        results = [f.result() for f in futures]
    return results, time.perf_counter() - started[0]


def serve_concurrently(tmp: Path, adapter_dirs: list[Path], which: list[int], args) -> tuple:
    """Start `prefix-rft model-server`, store the adapters, send every request at once (streamed)."""
    import hashlib

    import httpx

    from service.storage import open_storage
    from worker.runner import write_archive

    storage = open_storage((tmp / "objects").as_uri())
    refs = []
    for i, directory in enumerate(adapter_dirs):
        archive = tmp / f"adapter-{i}.tar.gz"
        write_archive(directory, archive, arcname="adapter")
        storage.put_file(f"adapters/{i}.tar.gz", archive)
        refs.append(
            {
                "storage_key": f"adapters/{i}.tar.gz",
                "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            }
        )

    def body(i: int) -> dict:
        return {
            "target": {"name": f"adapter-{which[i]}", "base_model": MODEL, "adapter": refs[which[i]]},
            "request": chat_request(i, args, f"adapter-{which[i]}"),
        }

    server, url = start_model_server(tmp, args)
    try:
        # Warm-up, not timed: the base model and every adapter loaded (one request each).
        for i in range(len(adapter_dirs)):
            warm = {**body(i), "request": unstreamed(body(i)["request"])}
            httpx.post(f"{url}/v1/chat/completions", json=warm, timeout=600).raise_for_status()
        steps_before = httpx.get(f"{url}/stats").json()[MODEL]["steps"]
        results, seconds = stream_all(url, [body(i) for i in range(args.requests)])
        steps = httpx.get(f"{url}/stats").json()[MODEL]["steps"] - steps_before
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results, [r["ttft"] for r in results], seconds, steps


def against_llama_cpp(tmp: Path, args) -> dict:
    """The same 16 streamed requests to the base model: our model server vs llama.cpp's, alternating.

    Both servers get the same weights in bfloat16 (converted to GGUF for llama.cpp) and the
    machine's cores (`-t`); llama.cpp has one slot per request (`--parallel`).
    """
    import httpx

    from benchmarks import llama_cpp_peer
    from core.models import resolve_model_dir

    gguf = llama_cpp_peer.bf16_gguf(resolve_model_dir(MODEL))
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    ours = [
        {"target": {"name": MODEL, "base_model": MODEL}, "request": chat_request(i, args, MODEL)}
        for i in range(args.requests)
    ]
    theirs = [chat_request(i, args, MODEL) for i in range(args.requests)]
    runs: dict[str, list[dict]] = {"model_server": [], "llama_cpp": []}
    texts: dict[str, list[str]] = {}

    def measure(side: str, process, url: str, bodies: list[dict], warm_up: dict) -> None:
        """Warm the server up, send the requests, stop it; record the run under `side`."""
        try:
            httpx.post(f"{url}/v1/chat/completions", json=warm_up, timeout=600).raise_for_status()
            results, seconds = stream_all(url, bodies)
        finally:
            process.terminate()
            process.wait(timeout=60)
        tokens = sum(r["completion_tokens"] for r in results)
        runs[side].append(run_summary(tokens, seconds, [r["ttft"] for r in results]))
        texts[side] = [r["text"] for r in results]

    for repeat in range(args.repeats):
        log.info("base model, run %d/%d: our model server, then llama-server", repeat + 1, args.repeats)
        server, url = start_model_server(tmp, args)
        measure("model_server", server, url, ours, {**ours[0], "request": unstreamed(ours[0]["request"])})
        port = free_port()
        context = 256  # per slot: the longest prompt (about 40 tokens) and 64 new tokens fit
        peer = llama_cpp_peer.start(gguf, port, args.requests, context, threads, tmp / "llama-server.log")
        measure("llama_cpp", peer, f"http://127.0.0.1:{port}", theirs, unstreamed(theirs[0]))
    figures = {side: medians(summaries) for side, summaries in runs.items()}
    return {
        "gguf": gguf.name,
        "llama_cpp_version": f"vendored in llama-cpp-python {llama_cpp_peer.VERSION}",
        "threads": threads,
        **figures,
        "speedup": round(
            figures["model_server"]["tokens_per_s"]["median"]
            / figures["llama_cpp"]["tokens_per_s"]["median"],
            2,
        ),
        "target_speedup": TARGET_VS_LLAMA_CPP,
        "identical_outputs": sum(
            a == b for a, b in zip(texts["model_server"], texts["llama_cpp"], strict=True)
        ),
        "runs": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
