"""``prefixlb emulate``: starts, prints one URL per line, serves, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from prefixlb.emulator import start_fleet_process


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.timeout(60)
def test_cli_serves_a_fleet_and_stops_on_sigterm() -> None:
    fleet = start_fleet_process(
        2,
        profile="cpu-tiny-llama",
        time_scale=10,
        block_size=16,
        kv_capacity_tokens=4096,
        max_model_len=1024,
        model="tiny",
    )
    try:
        assert len(fleet.urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in fleet.urls)
        assert len(set(fleet.urls)) == 2
        for url in fleet.urls:
            assert get(url + "/health")[0] == 200
        body = post(fleet.urls[1] + "/v1/completions", {"model": "tiny", "prompt": "hi there", "max_tokens": 3})
        assert body["usage"]["completion_tokens"] == 3
        models = json.loads(get(fleet.urls[0] + "/v1/models")[1])
        assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 1024
    finally:
        t0 = time.monotonic()
        code = fleet.stop()
    assert code == 0 and time.monotonic() - t0 < 5.0  # SIGTERM -> clean exit
    with pytest.raises(OSError):
        get(fleet.urls[0] + "/health")


@pytest.mark.timeout(60)
def test_cli_prints_machine_readable_urls_and_exits_on_sigint() -> None:
    argv = [sys.executable, "-m", "prefixlb", "emulate", "--replicas", "1", "--base-port", "0"]
    argv += ["--profile", "cpu-tiny-llama", "--fault-replicas", "0", "--fault-error-rate", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("http://127.0.0.1:") and line.rsplit(":", 1)[1].isdigit()
        with pytest.raises(urllib.error.HTTPError) as err:
            post(line + "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert err.value.code == 500  # the fault flags reached replica 0
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == b""  # nothing but URLs on stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_cli_reports_a_bad_configuration() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "prefixlb", "emulate", "--profile", "no-such-profile", "--base-port", "0"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    assert b"unknown profile 'no-such-profile'" in r.stderr and r.stdout == b""


@pytest.mark.timeout(60)
def test_cli_publishes_kv_events_and_replays_under_uvloop() -> None:
    import msgpack
    import zmq

    fleet = start_fleet_process(
        1,
        profile="cpu-tiny-llama",
        block_size=16,
        num_gpu_blocks=64,
        max_model_len=512,
        kv_events_endpoint="tcp://127.0.0.1:*",
        kv_replay_endpoint="tcp://127.0.0.1:*",
        kv_topic="tier-small-{i}",
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    dealer = ctx.socket(zmq.DEALER)
    try:
        src = json.loads(get(fleet.urls[0] + "/kv_event_sources")[1])["0"]
        assert src["topic"] == "tier-small-0" and src["buffer_steps"] == 10_000
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(src["endpoint"])
        sub.poll(300)  # let the subscription reach the PUB
        time.sleep(0.2)
        post(fleet.urls[0] + "/v1/completions", {"prompt": "x " * 40, "max_tokens": 1})
        assert sub.poll(5000)
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"tier-small-0" and seq == (0).to_bytes(8, "big")
        assert msgpack.unpackb(payload)[1][0]["type"] == "BlockStored"
        dealer.connect(src["replay_endpoint"])
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert dealer.poll(5000)
        assert dealer.recv_multipart() == [b"", topic, seq, payload]
        assert dealer.poll(5000)
        assert dealer.recv_multipart() == [b"", b"", b"\xff" * 8, b""]
    finally:
        for s in (sub, dealer):
            s.close(0)
        ctx.term()
        assert fleet.stop() == 0


@pytest.mark.timeout(60)
def test_a_fleet_can_run_a_process_per_replica() -> None:
    from prefixlb.emulator.fleet import start_fleet_processes

    with start_fleet_processes(2, profile="cpu-tiny-llama", time_scale=10, block_size=16, kv_capacity_tokens=4096,
                               max_model_len=1024, model="tiny") as fleet:
        assert len(fleet.urls) == 2 and len({p.pid for p in fleet.procs}) == 2
        for u in fleet.urls:
            assert get(u + "/health")[0] == 200
            out = post(u + "/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2})
            assert out["usage"]["completion_tokens"] == 2
        procs = list(fleet.procs)
    assert all(p.proc.poll() is not None for p in procs)
