"""`kititans serve` throughput and latency per runtime, against llama.cpp's own server on the same GGUF, with
1 and 8 concurrent clients, measured interleaved in one run (shared machines are noisy: compare ratios).

    python benchmarks/serve_speed.py --run runs/tiny --llama-server /path/to/llama-server
    python benchmarks/serve_speed.py --run runs/tiny --rounds 3 --tokens 64 --out bench-out/serve

Every server is a separate process started from the command line a user would type (`kititans serve ...`,
`llama-server -m ...`), all on the same thread count, all serving the same model: the run directory
(torch), its GGUF (kititans llamacpp runtime and llama-server), its ONNX export (kititans onnx runtime and
onnxruntime-genai through `--runtime genai`, the same folder). Clients stream /v1/chat/completions with the
`openai` package, greedy, a fixed number of new tokens per request; time to first token is measured at the
first content chunk. Each round sends `--requests` single requests round-robin over the servers (1 client),
then one burst of `--requests` requests from 8 concurrent clients to each server in turn; every ratio to
llama-server is paired with llama-server's measurement taken right beside it (median, interquartile range).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_json

QUESTIONS = [
    "What does a cow say?",
    "Tell me a story about a red ball.",
    "Why is the sky blue?",
    "What did Lily find in the garden?",
    "Can you count to five?",
    "Where does the little robot live?",
    "What is the color of the sun?",
    "Who is Tom's best friend?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.args}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start(name: str, cmd: list[str], port: int, log_dir: Path) -> dict:
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return {"name": name, "proc": proc, "url": url, "log": log, "cmd": " ".join(cmd)}


def stop(server: dict) -> None:
    server["proc"].terminate()
    try:
        server["proc"].wait(20)
    except subprocess.TimeoutExpired:
        server["proc"].kill()
    server["log"].close()


def one_request(client, model: str, question: str, tokens: int) -> dict:
    """One streamed chat request of exactly `tokens` new tokens (ignore_eos: llama-server's extension, which
    kititans serve takes too)."""
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
        if getattr(event, "usage", None):
            usage = event.usage
    end = time.perf_counter()
    n = usage.completion_tokens if usage else chunks
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": n}


def load(server: dict, clients: int, per_client: int, tokens: int) -> dict:
    """`clients` threads, each streaming `per_client` requests one after the other."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    results: list[dict] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(per_client):
            q = QUESTIONS[(k * per_client + j) % len(QUESTIONS)]
            r = one_request(client, model, q, tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": total,
        "wall_s": wall,
        "throughput_tps": total / wall,
        "ttft_ms": [1000 * r["ttft"] for r in results],
        "latency_ms": [1000 * r["latency"] for r in results],
    }


def prepare(run: Path, work: Path, gguf_quant: str, onnx_quant: str) -> tuple[Path, Path]:
    from kititans.export import ExportOptions, export_model

    opts = ExportOptions(progress=False)
    gguf = export_model(run, "gguf", gguf_quant, work / f"model.{gguf_quant}.gguf", opts).path
    onnx = export_model(run, "onnx", onnx_quant, work / "onnx" / onnx_quant, opts).path
    return gguf, onnx


def summarize(name: str, clients: int, runs: list[dict]) -> dict:
    ttft = [x for r in runs for x in r["ttft_ms"]]
    lat = [x for r in runs for x in r["latency_ms"]]
    return {
        "server": name,
        "clients": clients,
        "requests": sum(r["requests"] for r in runs),
        "tokens/s (all clients)": round(statistics.median(r["throughput_tps"] for r in runs), 1),
        "TTFT median ms": round(statistics.median(ttft), 1),
        "TTFT p90 ms": round(sorted(ttft)[int(0.9 * (len(ttft) - 1))], 1),
        "latency median ms": round(statistics.median(lat), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a Lite run directory (its GGUF and ONNX exports are made)")
    ap.add_argument(
        "--llama-server", default=os.environ.get("KITITANS_LLAMA_SERVER") or shutil.which("llama-server")
    )
    ap.add_argument("--work", default="bench-out/serve-work", help="where the exports go")
    ap.add_argument("--out", default="bench-out/serve_speed", help="results: .json and .md")
    ap.add_argument("--gguf-quant", default="q8_0")
    ap.add_argument("--onnx-quant", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8, help="requests per load (split over the clients)")
    ap.add_argument("--servers", default="torch,llamacpp,onnx,genai,llama-server")
    args = ap.parse_args()
    run, work = Path(args.run), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf, onnx = prepare(run, work, args.gguf_quant, args.onnx_quant)
    kt = [sys.executable, "-c", "from kititans.cli import main; raise SystemExit(main())", "serve"]
    t = str(args.threads)
    wanted = args.servers.split(",")
    specs = {
        "kititans torch": [*kt, str(run), "--threads", t],
        "kititans llamacpp": [*kt, str(gguf), "--threads", t],
        "kititans onnx": [*kt, str(onnx), "--threads", t],
        "kititans genai": [*kt, str(onnx), "--runtime", "genai", "--threads", t],
    }
    specs = {k: v for k, v in specs.items() if k.split()[1] in wanted}
    if "llama-server" in wanted and args.llama_server:
        ctx = json.loads((run / "config.json").read_text())["max_position_embeddings"]
        # 8 slots of the model's whole context, so 8 clients are batched together; no weight repacking,
        # as kititans' llama.cpp runtime (research §5.5)
        specs["llama-server"] = [
            args.llama_server,
            "-m",
            str(gguf),
            "-t",
            t,
            "-tb",
            t,
            "-np",
            "8",
            "-c",
            str(8 * ctx),
            "--no-repack",
            "--no-webui",
        ]
    servers = []
    try:
        for name, cmd in specs.items():
            port = free_port()
            s = start(name.replace(" ", "-"), [*cmd, "--port", str(port)], port, work)
            s["name"] = name
            servers.append(s)
            print(f"started {name}: {s['cmd']}", file=sys.stderr)
        raw: dict[str, dict[int, list[dict]]] = {s["name"]: {1: [], 8: []} for s in servers}
        for s in servers:  # warm-up
            load(s, 1, 1, args.tokens)
        for r in range(args.rounds):
            # 1 client: one request per server in turn (seconds apart, so the machine's load is shared alike)
            for _ in range(args.requests):
                for s in servers:
                    raw[s["name"]][1].append(load(s, 1, 1, args.tokens))
            # 8 clients: one burst of `requests` requests per server, servers in turn
            for s in servers:
                raw[s["name"]][8].append(load(s, 8, max(1, args.requests // 8), args.tokens))
            for s in servers:
                last = {c: raw[s["name"]][c][-1]["throughput_tps"] for c in (1, 8)}
                print(
                    f"round {r + 1} {s['name']}: x1 {last[1]:.1f} tok/s, x8 {last[8]:.1f} tok/s",
                    file=sys.stderr,
                )
    finally:
        for s in servers:
            stop(s)
    rows = [summarize(name, c, runs) for name, by in raw.items() for c, runs in by.items()]
    if "llama-server" in raw:  # paired: each measurement against llama-server's taken right beside it
        for r in rows:
            mine, ref = raw[r["server"]][r["clients"]], raw["llama-server"][r["clients"]]
            ratios = [a["throughput_tps"] / b["throughput_tps"] for a, b in zip(mine, ref)]
            q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
            r["vs llama-server"] = f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f})"
    cols = [
        "server",
        "clients",
        "requests",
        "tokens/s (all clients)",
        "vs llama-server",
        "TTFT median ms",
        "TTFT p90 ms",
        "latency median ms",
    ]
    table = md_table(rows, cols)
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"),
        {
            "machine": machine(),
            "args": vars(args),
            "rows": rows,
            "commands": {s["name"]: s["cmd"] for s in servers},
        },
    )
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
