"""Load test of flexdit-serve: throughput and latency vs concurrency for three ways of serving
the same bundle on the same machine, every response checked. Not part of the test suite.

    python3 benchmarks/serve_load.py --model fashion --concurrency 1 4 16 64 --json benchmarks/results/serve_load-fashion.json
    python3 benchmarks/serve_load.py --model S --steps 10 --concurrency 1 4 16 64 --window 40

Modes (one Ray Serve application each, all deployed side by side on one local Ray, measured
in turn at each concurrency so machine noise hits them alike):
  a   one request at a time (``batching="none"``), on the serving bundle (static batch 16)
  a2  one request at a time on a batch-2 bundle: the best a one-at-a-time server can do
      (its graph holds exactly one image with CFG; no padding)
  b   Ray Serve's request batching of whole trajectories (``batching="request"``)
  c   stage-aware continuous batching (``batching="stage"``, the default)
N closed-loop clients (each sends a one-image request, waits for it, sends the next) run for
``--window`` seconds after ``--warmup``; images/s counts the responses that end inside the
window; latencies are those responses' submit-to-answer times. Requests still open at the end
are waited for and checked too. Each request draws a (class, seed) pair from a pool whose
reference PNGs were drawn beforehand by the code path of ``flexdit-run`` (Pipeline; the first
two also by the real ``flexdit-run`` CLI, byte for byte), so every response is checked: HTTP 200,
its own id echoed, PNG bytes identical to the reference of its pair. Lost (no answer or an
error), duplicated and wrong responses are counted and must be 0.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

MODES = {"a": ("none", "serve"), "a2": ("none", "b2"), "b": ("request", "serve"), "c": ("stage", "serve")}


def build_bundles(model: str, work: Path, batch: int) -> dict:
    from bundle_footprint import FASHION, _cli, _random_checkpoint

    if model == "fashion":
        ckpt, extra = FASHION, []
    else:
        ckpt, extra = _random_checkpoint(model, work / f"flex{model}.pt")
        extra += ["--schedule", "paper4"]
    out = {"serve": work / f"{model}-b{batch}", "b2": work / f"{model}-b2"}
    for key, path in out.items():
        if not (path / "manifest.json").exists():
            _cli("convert", ckpt, "-o", path, *extra, "--batch", str(batch if key == "serve" else 2), "--force")
    return out


def references(bundle: Path, pairs: list, threads: int) -> list[bytes]:
    """PNG bytes of every (class, seed, steps) request through Pipeline, the code path of flexdit-run."""
    from flexdit_runtime.images import png_bytes
    from flexdit_runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, threads=threads)
    return [png_bytes(pipe([c], steps=n, seed=s).images[0]) for c, s, n in pairs]


def cli_check(bundle: Path, pairs: list, refs: list, work: Path) -> None:
    """The first two references against the real flexdit-run CLI's PNG files."""
    for (c, s, steps), ref in list(zip(pairs, refs))[:2]:
        d = work / f"cli-{bundle.name}-{c}-{s}"
        (work / "p.txt").write_text(f"{c}\n")
        subprocess.run([sys.executable, "-m", "flexdit_runtime.cli", str(work / "p.txt"), "--bundle", str(bundle),
                        "-o", str(d), "--steps", str(steps), "--seed", str(s), "-q", "--force"], check=True)
        png = next(d.glob("000_*.png")).read_bytes()
        if png != ref:
            raise SystemExit(f"reference for class {c} seed {s} differs from flexdit-run's PNG")


class Client(threading.Thread):
    def __init__(self, port, prefix, pairs, stop_at, rng, log, lock):
        super().__init__(daemon=True)
        self.port, self.prefix, self.pairs = port, prefix, pairs
        self.stop_at, self.rng, self.log, self.lock = stop_at, rng, log, lock

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        n = 0
        while time.monotonic() < self.stop_at:
            k = self.rng.randrange(len(self.pairs))
            c, s, steps = self.pairs[k]
            rid = f"{self.name}-{n}"
            n += 1
            body = json.dumps({"prompts": [c], "seed": s, "steps": steps, "id": rid})
            t0 = time.monotonic()
            try:
                conn.request("POST", f"{self.prefix}/v1/images", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                status = r.status
            except Exception as e:  # a lost connection counts as a lost request
                status, data = -1, repr(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            t1 = time.monotonic()
            with self.lock:
                self.log.append({"id": rid, "pair": k, "t0": t0, "t1": t1, "status": status, "data": data})


def run_window(port, prefix, pairs, refs, clients, warmup, window, seed) -> dict:
    log, lock = [], threading.Lock()
    start = time.monotonic()
    lo, hi = start + warmup, start + warmup + window
    rng = random.Random(seed)
    threads = [Client(port, prefix, pairs, hi, random.Random(rng.random()), log, lock) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = {e["id"] for e in log}
    seen, lost, wrong, dup = set(), 0, 0, 0
    for e in log:
        if e["status"] != 200:
            lost += 1
            continue
        body = json.loads(e["data"])
        if body.get("id") in seen:
            dup += 1
        seen.add(body.get("id"))
        png = base64.b64decode(body["images"][0]["png_base64"])
        if body.get("id") != e["id"] or png != refs[e["pair"]]:
            wrong += 1
    inside = [e for e in log if e["status"] == 200 and lo <= e["t1"] <= hi]
    lat = sorted(e["t1"] - e["t0"] for e in inside)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    errors = sorted({(e["status"], e["data"][:120].decode(errors="replace")) for e in log if e["status"] != 200})
    return {"clients": clients, "requests": len(log), "images_per_s": len(inside) / window,
            "p50_s": pct(0.50), "p95_s": pct(0.95), "p99_s": pct(0.99), "lost": lost, "wrong": wrong,
            "duplicated": dup, "unanswered": len(sent) - len(log), "errors": errors[:3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="fashion", help="fashion | S | B (random-weight DiT-S/2- or B/2-sized FlexDiT)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--limit", nargs="*", default=[], metavar="MODE=N",
                    help="run MODE only up to N clients (e.g. a=16: one-at-a-time on the padded batch-16 graph "
                         "would keep 64 clients waiting minutes)")
    ap.add_argument("--batch", type=int, default=16, help="static batch of the serving bundle")
    ap.add_argument("--steps", type=int, nargs="+", default=[20],
                    help="sampling steps per request; several: each request draws one (a mixed workload)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--pool", type=int, default=24, help="distinct (class, seed) pairs with reference images")
    ap.add_argument("--timeout", type=float, default=120.0, help="the server's request time-out")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    bundles = build_bundles(args.model, work, args.batch)
    from flexdit_bundle import load_bundle

    nclass = load_bundle(bundles["serve"], verify_checksums=False).model.num_classes
    rng = random.Random(0)
    pairs = [(rng.randrange(nclass), rng.randrange(10**6), args.steps[i % len(args.steps)]) for i in range(args.pool)]
    t = time.monotonic()
    refs = {k: references(b, pairs, args.threads) for k, b in bundles.items()
            if any(MODES[m][1] == k for m in args.modes)}
    for k, r in refs.items():
        cli_check(bundles[k], pairs, r, work)
    print(f"references: {args.pool} pairs x {len(refs)} bundles in {time.monotonic() - t:.0f} s", file=sys.stderr)

    import ray
    from ray import serve

    from flexdit_serve.app import build_app
    from flexdit_serve.config import ServeConfig

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=8)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    for m in args.modes:
        batching, key = MODES[m]
        cfg = ServeConfig(bundle=str(bundles[key]), batching=batching, threads=args.threads, ray_cpus=0,
                          timeout_s=args.timeout, max_images_per_request=1,
                          max_queue=2 * max(args.concurrency))  # the clients' requests wait; none is refused
        serve.run(build_app(cfg), name=m, route_prefix=f"/{m}")
    limits = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    rows = []
    for c in args.concurrency:
        for m in args.modes:
            if c > limits.get(m, c):
                continue
            r = run_window(args.port, f"/{m}", pairs, refs[MODES[m][1]], c, args.warmup, args.window,
                           seed=c)
            r["mode"] = m
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "errors"}), file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    out = {"model": args.model, "steps": args.steps, "batch": args.batch, "threads": args.threads,
           "window_s": args.window, "pool": args.pool, "timeout_s": args.timeout, "rows": rows,
           "bundles": {k: str(v) for k, v in bundles.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out))


def table(out: dict) -> str:
    by = {(r["mode"], r["clients"]): r for r in out["rows"]}
    lines = ["| clients | mode | images/s | p50 s | p95 s | p99 s | c / this | lost / wrong / dup |", "|---|---|---|---|---|---|---|---|"]
    for (m, c), r in sorted(by.items(), key=lambda kv: (kv[0][1], list(MODES).index(kv[0][0]))):
        ref = by.get(("c", c))
        ratio = f"{ref['images_per_s'] / r['images_per_s']:.2f}x" if ref and r["images_per_s"] else "-"
        lines.append(f"| {c} | {m} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{ratio} | {r['lost']} / {r['wrong']} / {r['duplicated']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
