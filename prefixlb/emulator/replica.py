"""One emulated vLLM replica: the engine, a scaled wall clock, a driver task, an HTTP port.

The driver runs the engine the way vLLM's engine core loop does, in emulated time::

    while the engine has work:
        res = engine.step(start)               # plan + commit one forward pass
        sleep until wall_at(res.end)           # the step "runs"
        deliver res.outputs to the handlers    # tokens, finishes
        publish res.events as one KV batch     # at most one batch per step, as vLLM
        publish counters/gauges for /metrics

Requests that arrive while a step runs join the next one. Steps follow each other back to
back in emulated time (``start`` = the previous ``res.end``), so if the host wakes up late the
driver catches up by not sleeping, as SimPy's real-time environment does; the lateness is
exported (``prefixlb_emulator_lag_seconds``, ``prefixlb_emulator_late_steps_total``) and logged.
If it falls more than ``max_lag`` wall seconds behind, catching up is abandoned and emulated
time is re-anchored to now (``prefixlb_emulator_rebases_total``): the host cannot sustain the
requested time scale and the run's timings are stretched.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

import zmq.asyncio
from aiohttp import web

from prefixlb.engine import (
    Engine,
    EngineRequest,
    HFTokenizer,
    RequestOutput,
    StepResult,
    Tokenizer,
    default_tokenizer,
)

from .clock import ScaledClock
from .config import EMULATED_VLLM_VERSION, ReplicaConfig, endpoint_binds, replica_endpoint
from .faults import FaultState
from .kv_events import KVEventPublisher
from .metrics import ReplicaMetrics

__all__ = ["EmulatedReplica", "ReplicaStopped", "RequestStream", "load_tokenizer"]

log = logging.getLogger("prefixlb.emulator")


class ReplicaStopped(Exception):
    """The replica stopped (or its engine died) while a request was in flight."""


def load_tokenizer(spec: str | Tokenizer | None) -> Tokenizer:
    """A tokenizer from a directory path, an instance, or None (the byte tokenizer)."""
    if spec is None:
        return default_tokenizer()
    if isinstance(spec, str):
        return HFTokenizer.from_dir(spec)
    return spec


class RequestStream:
    """Outputs of one request as the driver delivers them: ``(output, emulated time)`` pairs."""

    __slots__ = ("_error", "_event", "_items", "last_token_t", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._items: list[tuple[RequestOutput, float]] = []
        self._event = asyncio.Event()
        self._error: BaseException | None = None
        self.last_token_t: float | None = None

    def push(self, out: RequestOutput, t: float) -> None:
        self._items.append((out, t))
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        self._error = exc
        self._event.set()

    async def get(self) -> list[tuple[RequestOutput, float]]:
        """Everything delivered since the last call (waits for at least one item)."""
        while not self._items:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        items, self._items = self._items, []
        return items


class EmulatedReplica:
    """One replica (see the module docstring). Use :class:`~prefixlb.emulator.EmulatedFleet`
    to run several; ``await start()`` / ``await stop()`` otherwise.

    ``index`` names the replica in its KV topic (``replica-<index>``) and offsets its bound
    KV endpoints; ``port`` 0 picks a free port (``url`` tells which).
    """

    def __init__(
        self,
        config: ReplicaConfig,
        index: int = 0,
        *,
        port: int = 0,
        tokenizer: Tokenizer | None = None,
        zmq_context: zmq.asyncio.Context | None = None,
        peers: Callable[[int], EmulatedReplica | None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.index = index
        self.port = port
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        events_on = config.kv_events_endpoint is not None
        self.engine = Engine(
            config.profile,
            model=config.model,
            block_size=config.block_size,
            num_gpu_blocks=config.num_gpu_blocks,
            kv_capacity_tokens=config.kv_capacity_tokens,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            hash_algo=config.hash_algo,
            enable_kv_events=events_on,
            tokenizer=self.tokenizer,
            grade_quality=config.expose_quality,
        )
        self.model = self.engine.model
        self.topic = config.kv_topic.format(i=index)
        self.metrics = ReplicaMetrics(self.engine, time_scale=config.time_scale)
        self.system_fingerprint = f"vllm-{EMULATED_VLLM_VERSION}-{_short_hash(self.model, index)}"
        self.started_at = int(time.time())
        self.in_flight = 0  # generation requests being served (``/load``)
        self.dead: BaseException | None = None
        self._zmq = zmq_context
        self._own_zmq = False
        self._peers = peers
        self._streams: dict[str, RequestStream] = {}
        self._next_id = 0
        self._work: asyncio.Event | None = None
        self._wake_t: float | None = None  # emulated arrival that woke the idle driver
        self._driver: asyncio.Task[None] | None = None
        self._last_lag_log = 0.0
        self.clock: ScaledClock = None  # type: ignore[assignment]  # set in start()
        self.publisher: KVEventPublisher | None = None
        self.faults: FaultState = FaultState(self, config.faults, config.seed)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def is_up(self) -> bool:
        """Whether the port accepts connections (False after an injected crash, or while flapping down)."""
        return self._server is not None

    async def start(self) -> None:
        """Start the driver, the KV publisher and the HTTP port."""
        from .api import build_app  # the HTTP layer depends on the replica, not the reverse

        loop = asyncio.get_running_loop()
        self.clock = ScaledClock(self.config.time_scale, loop)
        self._work = asyncio.Event()
        cfg = self.config
        try:
            if cfg.kv_events_endpoint is not None:
                if self._zmq is None:
                    self._zmq = zmq.asyncio.Context()
                    self._own_zmq = True
                ep = replica_endpoint(cfg.kv_events_endpoint, self.index, binds=endpoint_binds(cfg.kv_events_endpoint))
                replay = (
                    replica_endpoint(cfg.kv_replay_endpoint, self.index, binds=True) if cfg.kv_replay_endpoint else None
                )
                self.publisher = KVEventPublisher(
                    self._zmq, ep, self.topic, replay_endpoint=replay, buffer_steps=cfg.kv_buffer_steps, hwm=cfg.kv_hwm
                )
                self.publisher.start()
            self._driver = loop.create_task(self._drive(), name=f"emulator-driver-{self.index}")
            self._runner = web.AppRunner(
                build_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await self._runner.setup()
            await self._listen()
            self.faults.start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the port, fail in-flight requests, stop the driver and the KV sockets."""
        await self.faults.stop()
        self._close_port(drop_connections=False)
        err = ReplicaStopped("the replica is shutting down")
        for s in list(self._streams.values()):
            s.fail(err)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
            self._driver = None
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        if self._own_zmq and self._zmq is not None:
            self._zmq.term()
            self._zmq = None

    # -- the port (up/down for crash and flap faults) ----------------------------------------------

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, sock=sock, backlog=1024)

    def _close_port(self, *, drop_connections: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if drop_connections and self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                transport = handler.transport
                if transport is not None:
                    transport.abort()

    def go_down(self) -> None:
        """Stop accepting connections and drop the open ones (a crash, as a client sees it)."""
        if self._server is None:
            return
        log.warning("replica %d (%s) is down (injected fault)", self.index, self.url)
        self._close_port(drop_connections=True)

    async def go_up(self) -> None:
        """Accept connections again on the same port."""
        if self._server is not None or self._runner is None:
            return
        await self._listen()
        log.warning("replica %d (%s) is up again", self.index, self.url)

    def peer(self, index: int) -> EmulatedReplica | None:
        """Another replica of the same process (for ``/admin/faults`` with ``replica``)."""
        if index == self.index:
            return self
        return self._peers(index) if self._peers is not None else None

    # -- requests -----------------------------------------------------------------------------------

    def new_request_id(self, base: str) -> str:
        """An engine id unique in this replica (vLLM also suffixes ids internally)."""
        self._next_id += 1
        return f"{base}-{self._next_id}"

    def submit(self, req: EngineRequest) -> RequestStream:
        """Queue a request now; raises ValueError (vLLM's wording) if the engine refuses it."""
        if self.dead is not None:
            raise ReplicaStopped(f"the engine is dead: {self.dead!r}")
        assert self._work is not None, "start() the replica first"
        now = self.clock.now()
        self.engine.add_request(req, now)
        stream = RequestStream(req.request_id)
        self._streams[req.request_id] = stream
        if self._wake_t is None:
            # the step starts when the request arrived, not when the driver task got to run:
            # at time scale X a 0.1 ms task switch would otherwise cost X x 0.1 ms of emulated time
            self._wake_t = now
        self._work.set()
        return stream

    def abort(self, request_id: str, *, stop_string: bool = False) -> bool:
        """Abort a request now (client gone, or a stop string ended it); False if already finished.

        ``stop_string`` makes ``/metrics`` count it as ``finished_reason="stop"`` as vLLM does.
        """
        self._streams.pop(request_id, None)
        out = self.engine.abort(request_id, self.clock.now())
        if out is None:
            return False
        if stop_string:
            self.metrics.stop_string_finishes += 1
        self.metrics.on_output(out, self.clock.now(), None)
        events = self.engine.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)
        self.metrics.snapshot = self.engine.metrics()
        return True

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (vLLM's dev endpoint); publishes ``AllBlocksCleared``."""
        ok = self.engine.reset_prefix_cache()
        events = self.engine.take_events()
        if events and self.publisher is not None:
            self.publisher.publish(events)
        self.metrics.snapshot = self.engine.metrics()
        return ok

    # -- the driver ---------------------------------------------------------------------------------

    async def _drive(self) -> None:
        try:
            await self._run_engine()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the engine raised: behave like vLLM's EngineDeadError
            log.exception("replica %d: the engine failed; the replica is dead", self.index)
            self.dead = exc
            for s in list(self._streams.values()):
                s.fail(ReplicaStopped(f"the engine is dead: {exc!r}"))
            self._streams.clear()

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        engine, clock, cfg, metrics = self.engine, self.clock, self.config, self.metrics
        work = self._work
        assert work is not None
        max_lag_virtual = cfg.max_lag * cfg.time_scale
        prev_end: float | None = None
        while True:
            if not engine.has_unfinished():
                prev_end = None
                self._wake_t = None
                metrics.snapshot = engine.metrics()
                work.clear()
                await work.wait()
                continue
            now = clock.now()
            if prev_end is not None:
                start = prev_end
            else:
                start = self._wake_t if self._wake_t is not None else now
                self._wake_t = now  # not idle any more; later arrivals join the running schedule
            if prev_end is not None and now - prev_end > max_lag_virtual:
                metrics.rebases.inc()
                start = now
            res = engine.step(start)
            if res is None:
                continue
            if res.duration <= 0 and not res.scheduled:
                # nothing could be scheduled (should not happen: the engine guarantees progress)
                prev_end = None
                await asyncio.sleep(clock.wall(1e-3) or 1e-3)
                continue
            target = clock.wall_at(res.end)
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let handlers run even when catching up
            lag = loop.time() - target
            metrics.lag.set(max(0.0, lag))
            if lag > cfg.late_tolerance:
                metrics.late_steps.inc()
                wall_now = loop.time()
                if wall_now - self._last_lag_log > 10.0:
                    self._last_lag_log = wall_now
                    log.warning(
                        "replica %d is falling behind: a step was delivered %.1f ms late at time scale %g; "
                        "emulated time runs slower than requested",
                        self.index,
                        lag * 1e3,
                        cfg.time_scale,
                    )
            prev_end = res.end
            self._deliver(res)

    def _deliver(self, res: StepResult) -> None:
        t = res.end
        metrics = self.metrics
        streams = self._streams
        for out in res.outputs:
            s = streams.get(out.request_id)
            metrics.on_output(out, t, s.last_token_t if s is not None else None)
            if s is not None:
                if out.new_token_ids:
                    s.last_token_t = t
                s.push(out, t)
                if out.finished:
                    del streams[out.request_id]
        metrics.on_step(res)
        if res.events and self.publisher is not None:
            self.publisher.publish(res.events)
        metrics.snapshot = self.engine.metrics()

    def __repr__(self) -> str:
        return f"EmulatedReplica({self.index}, {self.url}, {self.engine!r})"


def _short_hash(model: str, index: int) -> str:
    import hashlib

    return hashlib.blake2b(f"{model}/{index}".encode(), digest_size=4).hexdigest()
