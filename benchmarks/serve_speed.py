"""`kititans serve` throughput and time to first token with 1, 4, 8 and 16 concurrent clients, per runtime
(torch, llama.cpp, ONNX; Lite and Titans), against llama.cpp's own `llama-server` on the same GGUF and thread
count, all measured interleaved in one run (shared machines are noisy: compare ratios); scoring throughput
(echo + logprobs, prompt tokens/s); and how often a batched runtime's tokens differ from a lone run's.

    python benchmarks/serve_speed.py --run runs/tiny --titans-run runs/titans-tiny \\
        --llama-server /path/to/llama-server --out bench-out/serve_speed

Every server is a separate process started as a user would (`kititans serve ...`, `llama-server -m ...`),
all on `--threads` threads. Clients stream /v1/completions with the `openai` package, `--tokens` new tokens
per request (ignore_eos, greedy); time to first token is taken at the first text chunk. A round runs, for each
client count, one load per server in turn: `clients` threads, each sending `--per-client` requests one after
the other; aggregate tokens/s = all tokens / wall time. Ratios pair each measurement with the reference
taken in the same round (llama-server for the llama.cpp runtime; the server's own 1-client load otherwise).
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

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside",
    "Tom had a big red ball. One day he went to the park",
    "The cat sat on the mat and looked at the bird in the tree",
    "Sue wanted to bake a cake for her mom",
    "A little robot lived in a small house near the sea",
    "The dog ran to the park to find his friend",
    "Ben and Anna went to the zoo. They saw a lion",
    "It was a sunny day and the sky was blue",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(proc.args)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def start(name: str, cmd: list[str], work: Path) -> dict:
    port = free_port()
    log = open(work / f"{name.replace(' ', '-')}.log", "w")  # noqa: SIM115 - closed in stop()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return {"name": name, "proc": proc, "url": url, "log": log, "cmd": " ".join(cmd)}


def stop(server: dict) -> None:
    server["proc"].terminate()
    try:
        server["proc"].wait(30)
    except subprocess.TimeoutExpired:
        server["proc"].kill()
    server["log"].close()


def openai_client(server: dict):
    import openai

    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0, timeout=900)
    return c, c.models.list().data[0].id


def one_request(c, model: str, prompt: str, tokens: int) -> dict:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = c.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    for event in stream:
        if event.choices and event.choices[0].text and first is None:
            first = time.perf_counter()
        if getattr(event, "usage", None):
            n = event.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tokens": n}


def cpu_seconds(server: dict) -> float:
    """User + system CPU time of the server process so far (its threads included)."""
    import psutil

    t = psutil.Process(server["proc"].pid).cpu_times()
    return t.user + t.system


def load(server: dict, clients: int, per_client: int, tokens: int) -> dict:
    """`clients` threads, each streaming `per_client` requests one after the other; the server's CPU time
    per token (on a loaded machine wall time mostly says how much CPU a process was given, CPU time how
    much work it did)."""
    c, model = openai_client(server)
    results: list[dict] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(per_client):
            r = one_request(c, model, PROMPTS[(k + j) % len(PROMPTS)], tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    cpu0, t0 = cpu_seconds(server), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(server) - cpu0
    n = sum(r["tokens"] for r in results)
    return {"tps": n / wall, "tpcs": n / max(cpu, 1e-9), "ttft_ms": [1000 * r["ttft"] for r in results]}


def scoring(server: dict, rows: list[list[int]], batch: int, clients: int) -> float:
    """Prompt tokens/s of echo + logprobs requests in lm-eval's shape (token ids, `batch` prompts each)."""
    c, model = openai_client(server)
    groups = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    lock, todo = threading.Lock(), list(groups)

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                g = todo.pop()
            c.completions.create(model=model, prompt=g, max_tokens=1, temperature=0, logprobs=1, echo=True)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(len(r) for r in rows) / (time.perf_counter() - t0)


def exactness(server: dict, tokens: int, n: int = 8) -> dict:
    """n seeded sampled requests alone (one at a time), then all n at once: how many answers differ, and
    the share of tokens after the first difference."""
    c, model = openai_client(server)

    def ask(i: int) -> list[str]:
        out = c.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens, seed=i,
                                   temperature=1.0, logprobs=0, extra_body={"ignore_eos": True, "top_k": 0})  # fmt: skip
        return out.choices[0].logprobs.tokens

    alone = [ask(i) for i in range(n)]
    together: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [
        next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(alone, together)
    ]
    differ = sum(len(a) - f for a, f in zip(alone, firsts) if f is not None)
    return {"answers_differing": sum(f is not None for f in firsts), "answers": n,
            "tokens_after_first_difference": differ, "tokens": sum(map(len, alone))}  # fmt: skip


def batch_invariance(paths: dict[str, Path], run: Path, threads: int, steps: int = 32) -> list[dict]:
    """In-process, per batched runtime: 8 sequences decoded greedily together and each alone, through the
    multi-sequence interface: the largest logit difference and the share of greedy tokens that differ."""
    import numpy as np

    from kititans.runtimes import load_runtime

    out = []
    for name, path in (("torch lite", run), ("llamacpp lite", paths["gguf"]), ("onnx lite", paths["onnx"])):
        rt = load_runtime(path, threads=threads)
        rng = np.random.default_rng(0)
        rows = [
            [rt.codec.bos_id, *rng.integers(5, rt.vocab_size - 1, size=n).tolist()]
            for n in (5, 9, 17, 3, 30, 12, 7, 21)
        ]
        alone_t, alone_l = [], []
        for ids in rows:
            rt.reset()
            lg = [rt.forward(ids)]
            tk = [int(np.argmax(lg[-1]))]
            for _ in range(steps):
                lg.append(rt.forward([tk[-1]]))
                tk.append(int(np.argmax(lg[-1])))
            alone_t.append(tk)
            alone_l.append(lg)
        seqs = rt.sequences(8)
        hs, toks, diff = [], [], 0.0
        for i, ids in enumerate(rows):
            h, lg = seqs.add(ids)
            hs.append(h)
            toks.append([int(np.argmax(lg))])
            diff = max(diff, float(np.abs(lg - alone_l[i][0]).max()))
        for j in range(steps):
            o = seqs.step({h: t[-1] for h, t in zip(hs, toks)})
            for i, h in enumerate(hs):
                diff = max(diff, float(np.abs(o[h] - alone_l[i][j + 1]).max()))
                toks[i].append(int(np.argmax(o[h])))
        flips = sum(a != b for x, y in zip(alone_t, toks) for a, b in zip(x, y))
        out.append({"runtime": name, "max |logit batched - alone|": f"{diff:.2e}",
                    "greedy tokens differing": f"{flips}/{len(rows) * (steps + 1)}"})  # fmt: skip
    return out


def exports(run: Path, titans: Path | None, work: Path, gguf_quant: str) -> dict[str, Path]:
    from kititans.export import ExportOptions, export_model

    opts = ExportOptions(progress=False)
    out = {"gguf": export_model(run, "gguf", gguf_quant, work / f"model.{gguf_quant}.gguf", opts).path,
           "onnx": export_model(run, "onnx", "fp32", work / "onnx" / "fp32", opts).path}  # fmt: skip
    if titans is not None:
        out["titans-onnx"] = export_model(titans, "onnx", "fp32", work / "titans-onnx", opts).path
    return out


def specs(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, list[str]]:
    kt = [sys.executable, "-c", "from kititans.cli import main; raise SystemExit(main())", "serve"]
    common = ["--threads", str(args.threads), "--parallel", str(max(args.clients)), "--quiet"]
    out = {
        "torch lite": [*kt, str(args.run), *common],
        "llamacpp lite": [*kt, str(paths["gguf"]), *common],
        "onnx lite": [*kt, str(paths["onnx"]), *common],
    }
    if args.titans_run:
        out["torch titans"] = [*kt, str(args.titans_run), *common]
        out["onnx titans"] = [*kt, str(paths["titans-onnx"]), *common]
    if args.llama_server:
        ctx = json.loads((Path(args.run) / "config.json").read_text())["max_position_embeddings"]
        n = max(args.clients)  # one slot per client, each the model's whole context, no repacking (as ours)
        out["llama-server"] = [args.llama_server, "-m", str(paths["gguf"]), "-t", str(args.threads), "-tb",
                               str(args.threads), "-np", str(n), "-c", str(n * ctx), "--no-repack", "--no-webui"]  # fmt: skip
    wanted = set(args.servers.split(",")) if args.servers else None
    return {k: v for k, v in out.items() if wanted is None or k in wanted}


def paired(mine: list[float], ref: list[float]) -> str:
    ratios = [a / b for a, b in zip(mine, ref)]
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return f"{statistics.median(ratios):.2f}x ({q[0]:.2f}-{q[2]:.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a Lite run directory (its GGUF and ONNX exports are made)")
    ap.add_argument("--titans-run", help="a Titans run directory (served by torch and its ONNX export)")
    ap.add_argument(
        "--llama-server", default=os.environ.get("KITITANS_LLAMA_SERVER") or shutil.which("llama-server")
    )
    ap.add_argument("--work", default="bench-out/serve-work", help="where the exports and server logs go")
    ap.add_argument("--out", default="bench-out/serve_speed", help="results: .json and .md")
    ap.add_argument("--gguf-quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in a load")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", help="comma list of the servers to run (default: all)")
    ap.add_argument(
        "--score-prompts", type=int, default=64, help="prompts of 200 tokens for the scoring rate"
    )
    args = ap.parse_args()
    args.clients = [int(x) for x in args.clients.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    paths = exports(Path(args.run), Path(args.titans_run) if args.titans_run else None, work, args.gguf_quant)
    servers = []
    raw: dict[str, dict[int, list[dict]]] = {}
    extra: dict[str, dict] = {}
    try:
        for name, cmd in specs(args, paths).items():
            servers.append(start(name, cmd, work))
            servers[-1]["name"] = name
            print(f"started {name}: {servers[-1]['cmd']}", file=sys.stderr)
        raw = {s["name"]: {c: [] for c in args.clients} for s in servers}
        for s in servers:  # warm-up
            load(s, 2, 1, 8)
        for r in range(args.rounds):
            for c in args.clients:
                k = (r + c) % len(servers)  # a different server goes first each time: drift spreads evenly
                for s in servers[k:] + servers[:k]:
                    raw[s["name"]][c].append(load(s, c, args.per_client, args.tokens))
                line = ", ".join(f"{s['name']} {raw[s['name']][c][-1]['tps']:.0f}" for s in servers)
                print(f"round {r + 1}, {c} clients (tok/s): {line}", file=sys.stderr)
        import random

        rng = random.Random(0)
        rows = [[1, *(rng.randrange(5, 4000) for _ in range(199))] for _ in range(args.score_prompts)]
        for s in servers:
            if s["name"] == "llama-server":  # no echo + logprobs (llama.cpp PR #15189 is open)
                continue
            extra[s["name"]] = {
                "score_1x8": scoring(s, rows, 8, 1),
                "score_4x8": scoring(s, rows, 8, 4),
                "exactness": exactness(s, min(args.tokens, 48)),
            }
            print(f"{s['name']}: {extra[s['name']]}", file=sys.stderr)
    finally:
        for s in servers:
            stop(s)
    rows_out = []
    for name, by in raw.items():
        for c, runs in by.items():
            ttft = [x for r in runs for x in r["ttft_ms"]]
            row = {"server": name, "clients": c, "tok/s (all clients)": round(statistics.median(r["tps"] for r in runs), 1),
                   "TTFT median ms": round(statistics.median(ttft), 1),
                   "TTFT p90 ms": round(sorted(ttft)[int(0.9 * (len(ttft) - 1))], 1),
                   "vs own 1 client": paired([r["tps"] for r in runs], [r["tps"] for r in by[args.clients[0]]]),
                   "tokens per server CPU-s": round(statistics.median(r["tpcs"] for r in runs)),
                   "CPU: vs own 1 client": paired([r["tpcs"] for r in runs], [r["tpcs"] for r in by[args.clients[0]]])}  # fmt: skip
            if "llama-server" in raw and name != "llama-server":
                ref = raw["llama-server"][c]
                row["vs llama-server"] = paired([r["tps"] for r in runs], [r["tps"] for r in ref])
                row["CPU: vs llama-server"] = paired([r["tpcs"] for r in runs], [r["tpcs"] for r in ref])
            rows_out.append(row)
    cols = ["server", "clients", "tok/s (all clients)", "vs own 1 client", "vs llama-server", "TTFT median ms",
            "TTFT p90 ms", "tokens per server CPU-s", "CPU: vs own 1 client", "CPU: vs llama-server"]  # fmt: skip
    table = md_table(rows_out, cols)
    score_rows = [{"server": k, "prompt tok/s, 1 client x 8 prompts": round(v["score_1x8"]),
                   "prompt tok/s, 4 clients x 8 prompts": round(v["score_4x8"]),
                   "batched answers differing (of 8)": v["exactness"]["answers_differing"],
                   "tokens after a difference": f"{v['exactness']['tokens_after_first_difference']}/{v['exactness']['tokens']}"}
                  for k, v in extra.items()]  # fmt: skip
    table2 = md_table(score_rows, list(score_rows[0])) if score_rows else ""
    invariance = batch_invariance(paths, Path(args.run), args.threads)
    table3 = md_table(invariance, list(invariance[0]))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"machine": machine(), "load_avg_end": os.getloadavg(),
                                         "args": vars(args), "rows": rows_out, "scoring": extra,
                                         "batch_invariance": invariance, "load_avg_start": load_start,
                                         "commands": {s["name"]: s["cmd"] for s in servers}})  # fmt: skip
    out.with_suffix(".md").write_text(table + "\n\n" + table2 + "\n\n" + table3 + "\n")
    print(table + "\n\n" + table2 + "\n\n" + table3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
