"""The prefix-hit benchmark against real vLLM: two vLLM CPU replicas of an 88M-parameter model.

What it shows: on real vLLM (the CPU build of ../shared/real-vllm.md, ``make vllm``), with hit
rates read from vLLM's own ``vllm:prefix_cache_hits_total`` / ``queries_total``, how prefixlb's
``cache_aware`` compares with ``round_robin`` and with sglang-router's ``cache_aware`` on a
shared-prefix tenant workload under cache pressure. With the 88M model a prefix hit makes the
prefill 14-25x faster (real-vllm.md), so routing shows in TTFT as it does on a GPU.

Setup per target: a fresh pair of replicas (cold caches; ``--num-gpu-blocks-override`` sizes
the fleet's KV at ``--pressure`` times the workload's shared working set), each pinned to one
core, then the same seeded workload through the target. The machine has 2 cores, shared by the
two replicas, the balancer and the client: absolute times are this machine's, the comparison is
what matters. Bounds (pooled-cache hit rate, TTFT floor) come from the engine with the
``cpu-small-llama-88m`` profile and the model's own tokenizer.

Usage: python benchmarks/real_vllm.py [--requests 160] [--targets prefixlb,round_robin,sglang-router]
Needs: ``make vllm`` (the vLLM venv); the 88M model is generated on first use (~10 s).
Writes benchmarks/results/real_vllm.{json,md} and real_vllm_ttft_cdf.png.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import runner  # noqa: E402

from prefixlb.emulator.replica import load_tokenizer  # noqa: E402
from prefixlb.engine import request_prompt_ids  # noqa: E402
from prefixlb.loadgen import tenant_workload  # noqa: E402
from tests.realvllm.fleet import VLLM_VENV, VllmFleet, vllm_available  # noqa: E402

MODEL_DIR = ROOT / ".cache" / "models" / "small-llama"
SERVED = "small-llama"
BLOCK = 32
MAX_LEN = 2048


def ensure_model() -> None:
    if (MODEL_DIR / "model.safetensors").is_file():
        return
    subprocess.run([str(VLLM_VENV / "bin" / "python"), str(ROOT / "scripts" / "make_tiny_llama.py"), str(MODEL_DIR),
                    "--hidden", "1024", "--layers", "8", "--heads", "16"], check=True, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=400,
                    help="system prompt size in the byte tokenizer's tokens (about 2x that in the model's tokens)")
    ap.add_argument("--query-tokens", type=int, default=40)
    ap.add_argument("--pressure", type=float, default=1.2, help="fleet KV over the shared working set")
    ap.add_argument("--load", type=float, default=0.5)
    ap.add_argument("--targets", default="prefixlb,round_robin,sglang-router")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=runner.RESULTS)
    a = ap.parse_args(argv)
    ok, why = vllm_available(model_dir=MODEL_DIR) if (MODEL_DIR / "model.safetensors").is_file() else vllm_available()
    if not ok:
        print(f"real_vllm: {why}", file=sys.stderr)
        return 2
    ensure_model()

    specs = tenant_workload(seed=a.seed, tenants=a.tenants, system_tokens=a.system_tokens,
                            query_tokens=a.query_tokens, requests=a.requests, rate=1.0, model=SERVED)
    for s in specs:
        s.body["max_tokens"] = 8
    tok = load_tokenizer(str(MODEL_DIR))
    groups = {}
    for s in specs:
        groups.setdefault(s.group, s)
    # the shared working set in the model's tokens: each tenant's system prompt, once
    ws = sum(len(request_prompt_ids(tok, {"messages": s.body["messages"][:1]}, True)) for s in groups.values())
    blocks = max(MAX_LEN // BLOCK + 8, math.ceil(a.pressure * ws / 2 / BLOCK))
    print(f"real_vllm: {len(specs)} requests, {len(groups)} tenants, shared working set {ws} tokens; "
          f"{blocks} KV blocks of {BLOCK} per replica", file=sys.stderr)

    def start_fleet():
        fleet = VllmFleet(2, model_dir=MODEL_DIR, served_model_name=SERVED, block_size=BLOCK, max_model_len=MAX_LEN,
                          num_gpu_blocks_override=blocks)
        fleet.start()
        return fleet.urls, fleet.stop

    args = runner.build_args([
        "--workload", "tenants-real-vllm", "--targets", a.targets, "--replicas", "2", "--profile",
        "cpu-small-llama-88m", "--tokenizer", str(MODEL_DIR), "--block-size", str(BLOCK),
        "--replica-kv-tokens", str(blocks * BLOCK), "--load", str(a.load), "--model", SERVED,
        "--seed", str(a.seed), "--out", str(a.out), "--pressure", "0", "--name", "real_vllm",
    ])
    args.command_line = " ".join(["python", "benchmarks/real_vllm.py", *(sys.argv[1:] if argv is None else argv)])
    report = runner.run(args, fleet_factory=start_fleet, specs=specs)
    return 0 if report["targets"] and all("skipped" not in t for t in report["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
