"""Serving under load: the real `openai` client against `unift serve` (web.py) on the embedded model.

For 1, 16 and 50 concurrent clients (half of them streaming, the client's default two retries), each
client asks one chat question; one client at a time asks 16 in a row. Prints answered / refused
(429 after the retries), generated tokens/s for each level, the speed-up over one client, and the time
to first token (median and p95) of the streaming requests.

    python bench/serve_load.py [--levels 1 16 50] [--max_tokens 48] [--adapter_dir RUN] [--max_batch N] [--json OUT]

The server's /health counts follow the table: batches started, requests, the most rows decoded at once,
requests that joined a running batch, and batches decoded by generate() (the static path).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine  # noqa: E402

TOPICS = ["the sea", "a mountain", "bread", "a robot", "the moon", "rain", "a library", "music", "trains",
          "a garden", "winter", "a cat", "chess", "coffee", "a bridge", "stars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, adapter_dir: str | None, max_batch: int | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "web.py"), "--no_ui", "--port", str(port), "--served_model_name", "m"]
    if adapter_dir:
        cmd += ["--adapter_dir", adapter_dir]
    if max_batch:
        cmd += ["--max_batch", str(max_batch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited: " + (proc.stderr.read() if proc.stderr else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 3 minutes")


def one_request(client, i: int, max_tokens: int) -> tuple[bool, int, float | None]:
    """(answered, completion tokens, time to first token in seconds: streaming requests only, from the
    request to the first chunk with text)."""
    import openai

    messages = [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]
    start = time.perf_counter()
    try:
        if i % 2:
            tokens, first = 0, None
            for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens,
                                                        stream=True, stream_options={"include_usage": True}):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return True, tokens, first
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens)
        return True, reply.usage.completion_tokens, None
    except openai.RateLimitError:
        return False, 0, None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan without values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def level(base_url: str, clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=600)  # default max_retries=2
    requests = 16 if clients == 1 else clients
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one_request(client, i, max_tokens), range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t, _ in results)
    firsts = [f for _, _, f in results if f is not None]
    return {"clients": clients, "requests": requests, "answered": sum(ok for ok, _, _ in results),
            "refused": sum(not ok for ok, _, _ in results), "tokens": tokens, "seconds": wall,
            "tokens_per_second": tokens / wall, "ttft_median": percentile(firsts, 0.5),
            "ttft_p95": percentile(firsts, 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 50])
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--adapter_dir")
    parser.add_argument("--max_batch", type=int, help="the server's --max_batch (default: its own default)")
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args()
    port = free_port()
    server = start_server(port, ns.adapter_dir, ns.max_batch)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        level(base_url, 2, 4)  # warm-up: first-call costs out of the figures
        rows = [level(base_url, c, ns.max_tokens) for c in ns.levels]
        import httpx

        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    one = next((r for r in rows if r["clients"] == 1), rows[0])
    print(f"\nunift serve on the embedded model{' + ' + ns.adapter_dir if ns.adapter_dir else ''}, "
          f"max_tokens {ns.max_tokens}, half the clients streaming; {machine()}; {date.today()}\n")
    print(f"{'clients':>7} {'requests':>8} {'answered':>8} {'refused':>7} {'tokens':>7} {'seconds':>8} "
          f"{'tokens/s':>8} {'vs 1':>6} {'TTFT median s':>13} {'TTFT p95 s':>10}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['answered']:>8} {r['refused']:>7} {r['tokens']:>7} "
              f"{r['seconds']:>8.1f} {r['tokens_per_second']:>8.1f} "
              f"{r['tokens_per_second'] / one['tokens_per_second']:>5.1f}x {r['ttft_median']:>13.2f} "
              f"{r['ttft_p95']:>10.2f}")
    print("(time to first token: the streaming half of the requests, from sending to the first text)")
    print(f"\nserver (max_batch {health['max_batch']}): {health['batches']} batches for {health['requests']} requests, "
          f"largest {health['largest_batch']}, {health.get('joined', 0)} joined a running batch, "
          f"{health.get('static', 0)} decoded by generate()")
    if ns.json:
        ns.json.write_text(json.dumps({"levels": rows, "health": health}, indent=2))


if __name__ == "__main__":
    main()
