"""``prefixlb serve --workers N``: N processes on one port, stopped together by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp

from .support import FakeReplica


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


async def test_two_workers_share_the_port_and_stop_on_sigterm() -> None:
    rep = await FakeReplica().start()
    proc = subprocess.Popen([sys.executable, "-m", "prefixlb", "serve", "--replica", rep.url, "--port", "0",
                             "--workers", "2", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        urls = set()
        deadline = time.monotonic() + 60
        loop = asyncio.get_running_loop()
        while len(urls) < 2 and time.monotonic() < deadline:
            line = await loop.run_in_executor(None, proc.stdout.readline)
            m = re.search(r"listening on (http://\S+) \(worker (\d), pid (\d+)", line)
            if m:
                urls.add((m.group(1), int(m.group(3))))
            elif not line:
                break
        assert len(urls) == 2, urls
        assert len({u for u, _ in urls}) == 1  # one address, two workers
        base = next(iter(urls))[0]
        workers = [pid for _, pid in urls]
        assert set(workers) <= set(children(proc.pid))
        ok = 0
        conn = aiohttp.TCPConnector(force_close=True)  # new connections: the kernel spreads them
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as s:
            for i in range(40):
                async with s.post(base + "/v1/completions", json={"model": "auto", "prompt": f"p{i}",
                                                                  "max_tokens": 1}) as r:
                    ok += r.status == 200
        assert ok == 40
        assert rep.hits == 40
        os.kill(proc.pid, signal.SIGTERM)
        rc = await loop.run_in_executor(None, proc.wait, 30)
        assert rc == 0
        assert all(subprocess.run(["kill", "-0", str(w)], capture_output=True).returncode != 0 for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        await rep.stop()
