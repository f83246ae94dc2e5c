"""security: the admin API refuses without its token, no request can steer the balancer to an
upstream outside its replicas, and secrets never reach the logs.

Setup: ``prefixlb serve --config FILE --log-format json --access-log --log-level debug`` (a real
process, the admin token from ``PREFIXLB_ADMIN_TOKEN``) in front of two emulated replicas
(``prefixlb emulate``) and one fake replica of its own tier ("redir") that answers every
completion with a 307 redirect to the canary. The canary is a TCP server that records every
connection made to it: it is no replica, so any connection is a steering success.

1. Admin: every admin route (``/admin/replicas`` GET/POST, ``/admin/replicas/0`` GET/DELETE,
   ``.../drain``, ``.../undrain``, ``/admin/reload``, ``/admin/route``, ``/admin/tiers``,
   ``/admin/feedback``, ``/admin/classifier/kill``, an unknown ``/admin/x``) without a token and
   with wrong ones (another token, the token with a byte more or less, ``Basic``, ``Token``,
   the token in a query string or another header) must answer 401; path spellings that try to
   dodge the ``/admin/`` prefix (``//admin``, ``/v1/../admin``, ``/%61dmin``, absolute form, ...)
   must not answer 2xx; a second balancer started without a token refuses every admin route;
   afterwards the replica set and drain states are unchanged. With the right token each route
   answers something other than 401 (the list is real).
2. Steering: absolute-form targets, ``Host`` and ``X-Forwarded-*``/``Forwarded`` headers,
   ``x-prefixlb-replica``, ``model`` set to a URL, URL-ish body fields, path traversal toward
   the admin API, request smuggling (CL+TE), CONNECT and Upgrade, a replica's redirect -- the
   canary must see no connection.
3. Logs: the balancer's log (JSON lines, access log, debug level), after every request above,
   requests carrying a client ``Authorization`` secret (bad JSON, unknown model, a good one), a
   malformed request and an oversized header that carry it, a reload, must contain neither the
   admin token, nor the wrong tokens tried, nor the client secret, nor any ``authorization``
   value. A replica URL with a password in it is refused (config file, ``--replica``, admin
   API) without the password in the error.

Usage:
  python benchmarks/reliability/security.py            # about 20 s
  python benchmarks/reliability/security.py --quick    # the same checks (they are all fast)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    check,
    checks_md,
    command_line,
    header_md,
    machine,
    start_balancer,
    start_emulators,
    write_config,
    write_report,
)

# -- the canary and the redirecting replica --------------------------------------------------------------


class Canary:
    """A TCP server that accepts and records every connection (and its first bytes)."""

    def __init__(self) -> None:
        self.hits: list[dict] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Canary:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hit = {"at": time.time(), "peer": str(writer.get_extra_info("peername")), "first_bytes": ""}
        self.hits.append(hit)
        try:
            data = await asyncio.wait_for(reader.read(512), 2.0)
            hit["first_bytes"] = data.decode("latin-1")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            await writer.drain()
        except (asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class RedirectingReplica:
    """An OpenAI-shaped replica of tier "redir" whose completions redirect to ``target``."""

    MODEL = "redir-model"

    def __init__(self, target: str) -> None:
        self.target = target
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.completions = 0

    async def start(self) -> RedirectingReplica:
        app = web.Application()
        app.router.add_get("/health", lambda r: web.Response(text="ok"))
        app.router.add_get("/metrics", lambda r: web.Response(text=""))
        app.router.add_get("/v1/models", lambda r: web.json_response(
            {"object": "list", "data": [{"id": self.MODEL, "object": "model"}]}))
        app.router.add_post("/v1/chat/completions", self._redirect)
        app.router.add_post("/v1/completions", self._redirect)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def _redirect(self, request: web.Request) -> web.Response:
        self.completions += 1
        await request.read()
        return web.Response(status=307, headers={"location": self.target + request.path})

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# -- raw HTTP (aiohttp would normalise the paths and headers under test) ----------------------------------


async def raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send ``data`` on a fresh connection, read until the server closes (or ``timeout``);
    the status of the first response (0 if none) and everything read."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return 0, b""
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), end - time.monotonic())
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    finally:
        writer.close()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", out)
    return (int(m.group(1)) if m else 0), out


def req(method: str, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
        body: bytes = b"", host: str = "127.0.0.1") -> bytes:
    hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hdrs}
    if "host" not in names:
        hdrs.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        hdrs.append(("Content-Length", str(len(body))))
    if "connection" not in names:
        hdrs.append(("Connection", "close"))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
    return head.encode("latin-1") + body


CHAT = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4})
JSON = {"Content-Type": "application/json"}

ADMIN_ROUTES = [
    ("GET", "/admin/replicas", b""),
    ("POST", "/admin/replicas", b'{"url": "CANARY", "tier": "default"}'),
    ("GET", "/admin/replicas/0", b""),
    ("DELETE", "/admin/replicas/0", b""),
    ("POST", "/admin/replicas/0/drain", b""),
    ("POST", "/admin/replicas/0/undrain", b""),
    ("POST", "/admin/reload", b""),
    ("POST", "/admin/route", CHAT),
    ("GET", "/admin/tiers", b""),
    ("POST", "/admin/feedback", b'{"request_id": "x", "correct": true}'),
    ("POST", "/admin/classifier/kill", b""),
    ("GET", "/admin/no-such-route", b""),
]


def wrong_credentials(token: str) -> dict[str, tuple[list[tuple[str, str]], str]]:
    """name -> (headers, query suffix): every way of asking without the exact bearer token."""
    other = "plb-wrong-" + secrets.token_hex(12)
    basic = base64.b64encode(f"admin:{token}".encode()).decode()
    return {
        "no credentials": ([], ""),
        "another token": ([("Authorization", f"Bearer {other}")], ""),
        "token with a byte more": ([("Authorization", f"Bearer {token}x")], ""),
        "token with a byte less": ([("Authorization", f"Bearer {token[:-1]}")], ""),
        "empty bearer": ([("Authorization", "Bearer ")], ""),
        "Basic scheme": ([("Authorization", f"Basic {basic}")], ""),
        "Token scheme": ([("Authorization", f"Token {token}")], ""),
        "bare token": ([("Authorization", token)], ""),
        "token in a query string": ([], f"?token={token}&access_token={token}"),
        "token in another header": ([("X-Admin-Token", token), ("X-Api-Key", token)], ""),
    }


BYPASS_PATHS = [
    "//admin/replicas", "/admin//replicas", "/./admin/replicas", "/v1/../admin/replicas",
    "/v1/chat/completions/../../admin/replicas", "/%61dmin/replicas", "/admin%2Freplicas", "/ADMIN/replicas",
    "/Admin/replicas", "/admin/replicas/", "/admin/replicas;x", "/admin/replicas?x=1", "/admin/replicas#x",
    "/admin", "ABSOLUTE/admin/replicas",
]


async def admin_checks(port: int, token: str, canary: str) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    used = []
    creds = wrong_credentials(token)
    for name, (hdrs, _q) in creds.items():
        for _k, v in hdrs:
            used.append(v)
    for method, path, body in ADMIN_ROUTES:
        body = body.replace(b"CANARY", canary.encode())
        for name, (hdrs, query) in creds.items():
            status, _ = await raw(port, req(method, path + query, [*hdrs, *JSON.items()], body))
            rows.append({"route": f"{method} {path}", "credentials": name, "status": status,
                         "ok": status == 401})
    return rows, used


async def bypass_checks(port: int, token: str) -> list[dict]:
    rows = []
    for path in BYPASS_PATHS:
        target = path.replace("ABSOLUTE", f"http://127.0.0.1:{port}")
        for method in ("GET", "POST"):
            status, out = await raw(port, req(method, target, JSON, b'{"url": "http://127.0.0.1:9"}'))
            body = out.split(b"\r\n\r\n", 1)[-1]
            leaked = b'"breaker"' in body or b'"healthy"' in body
            rows.append({"request": f"{method} {target}", "status": status,
                         "ok": not (200 <= status < 300) and not leaked})
    return rows


async def with_token_checks(port: int, token: str) -> list[dict]:
    """With the right token every route answers something other than 401 (the list is real)."""
    auth = [("Authorization", f"Bearer {token}"), *JSON.items()]
    rows = []
    for method, path, body in ADMIN_ROUTES:
        if method == "DELETE" or path == "/admin/replicas" and method == "POST":
            continue  # they would change the replica set under test
        status, _ = await raw(port, req(method, path, auth, body))
        rows.append({"route": f"{method} {path}", "status": status, "ok": status not in (0, 401)})
    # leave replica 0 as it was (drain was tried above)
    await raw(port, req("POST", "/admin/replicas/0/undrain", auth))
    return rows


async def steering_checks(port: int, canary: Canary) -> list[dict]:
    c = canary.url
    chost = f"127.0.0.1:{canary.port}"
    attempts: list[tuple[str, bytes]] = [
        ("absolute-form target at the canary",
         req("POST", f"{c}/v1/chat/completions", JSON, CHAT, host=chost)),
        ("Host header set to the canary", req("POST", "/v1/chat/completions", JSON, CHAT, host=chost)),
        ("two Host headers", req("POST", "/v1/chat/completions", [("Host", "127.0.0.1"), ("Host", chost),
                                                                   *JSON.items()], CHAT)),
        ("x-prefixlb-replica request header",
         req("POST", "/v1/chat/completions", {**JSON, "x-prefixlb-replica": c}, CHAT)),
        ("X-Forwarded-Host / -Proto / -Port, Forwarded",
         req("POST", "/v1/chat/completions", {**JSON, "X-Forwarded-Host": chost, "X-Forwarded-Proto": "http",
                                              "X-Forwarded-Port": str(canary.port), "X-Forwarded-Server": chost,
                                              "Forwarded": f"host={chost};proto=http"}, CHAT)),
        ("X-Original-URL / X-Rewrite-URL",
         req("POST", "/v1/chat/completions", {**JSON, "X-Original-URL": c + "/v1/chat/completions",
                                              "X-Rewrite-URL": c + "/v1/chat/completions"}, CHAT)),
        ("model set to the canary URL",
         req("POST", "/v1/chat/completions", JSON, orjson.dumps(
             {"model": c, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))),
        ("model set to the canary URL + path",
         req("POST", "/v1/completions", JSON, orjson.dumps({"model": c + "/v1", "prompt": "x", "max_tokens": 2}))),
        ("URL-ish body fields (base_url, api_base, url, replica, endpoint, server)",
         req("POST", "/v1/chat/completions", JSON, orjson.dumps(
             {"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "base_url": c,
              "api_base": c, "url": c, "replica": c, "endpoint": c, "server": chost,
              "extra_body": {"base_url": c}}))),
        ("path traversal to POST /admin/replicas with the canary",
         req("POST", "/v1/../admin/replicas", JSON, orjson.dumps({"url": c, "tier": "default"}))),
        ("path traversal with encoded dots",
         req("POST", "/v1/%2e%2e/admin/replicas", JSON, orjson.dumps({"url": c, "tier": "default"}))),
        ("query string naming the canary",
         req("POST", f"/v1/chat/completions?replica={c}&url={c}&host={chost}", JSON, CHAT)),
        ("encoded slash in the route", req("POST", "/v1/chat%2Fcompletions", JSON, CHAT)),
        ("CL.TE request smuggling an admin call",
         req("POST", "/v1/chat/completions", [*JSON.items(), ("Content-Length", "4"),
                                              ("Transfer-Encoding", "chunked")],
             b"0\r\n\r\n" + req("POST", "/admin/replicas", JSON, orjson.dumps({"url": c, "tier": "default"})))),
        ("pipelined second request with the canary as Host",
         req("POST", "/v1/chat/completions", {**JSON, "Connection": "keep-alive"}, CHAT)
         + req("POST", f"{c}/v1/chat/completions", JSON, CHAT, host=chost)),
        ("CONNECT to the canary", req("CONNECT", chost, {"Host": chost})),
        ("Upgrade: websocket", req("GET", "/v1/models", {"Upgrade": "websocket", "Connection": "Upgrade",
                                                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                        "Sec-WebSocket-Version": "13"})),
        ("obs-fold header continuation naming the canary",
         b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
         b"X-Request-Id: a\r\n Host: " + chost.encode() + b"\r\nContent-Length: " + str(len(CHAT)).encode()
         + b"\r\nConnection: close\r\n\r\n" + CHAT),
        ("POST /admin/route with the canary as model (no token)",
         req("POST", "/admin/route", JSON, orjson.dumps({"model": c, "messages": [{"role": "user", "content": "x"}]}))),
        ("a replica that redirects to the canary (tier redir)",
         req("POST", "/v1/chat/completions", JSON, orjson.dumps(
             {"model": RedirectingReplica.MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}))),
        ("a replica that redirects to the canary, streaming",
         req("POST", "/v1/chat/completions", JSON, orjson.dumps(
             {"model": RedirectingReplica.MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
              "stream": True}))),
    ]
    rows = []
    for name, data in attempts:
        before = len(canary.hits)
        status, _ = await raw(port, data)
        await asyncio.sleep(0.05)
        rows.append({"attempt": name, "status": status, "canary_hits": len(canary.hits) - before,
                     "ok": len(canary.hits) == before})
    return rows


async def secret_traffic(port: int, base: str, token: str, client_secret: str) -> None:
    """Requests that carry secrets through every path that could log them."""
    auth = f"Bearer {client_secret}"
    hdr = {**JSON, "Authorization": auth, "X-Request-Id": "sec-probe-1"}
    await raw(port, req("POST", "/v1/chat/completions", hdr, CHAT))  # proxied (forwarded upstream)
    await raw(port, req("POST", "/v1/chat/completions", hdr, orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": "s"}], "max_tokens": 3, "stream": True})))
    await raw(port, req("POST", "/v1/chat/completions", hdr, b"{not json"))  # 400
    await raw(port, req("POST", "/v1/chat/completions", hdr, orjson.dumps(
        {"model": "no-such-model", "messages": []})))  # 404
    await raw(port, req("POST", "/v1/completions", hdr, orjson.dumps({"model": "auto", "prompt": 5})))  # 400
    await raw(port, req("GET", "/v1/models", {"Authorization": auth}))
    await raw(port, req("GET", "/metrics", {"Authorization": auth}))
    await raw(port, req("POST", "/admin/route", {**JSON, "Authorization": f"Bearer {token}"}, CHAT))
    await raw(port, req("POST", "/admin/reload", {"Authorization": f"Bearer {token}"}))
    await raw(port, req("GET", "/admin/replicas", {"Authorization": f"Bearer {token}"}))
    # malformed and oversized requests carrying the secrets
    await raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: " + auth.encode()
              + b"\r\nContent-Length: abc\r\n\r\n")
    await raw(port, b"GARBAGE\x01 / HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
    await raw(port, req("GET", "/admin/replicas", {"Authorization": f"Bearer {token}", "X-Big": "a" * 70_000}))
    await raw(port, req("POST", "/v1/chat/completions", {**hdr, "Content-Length": str(10**10)}))
    # a client that disconnects mid-stream with a secret header
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req("POST", "/v1/chat/completions", {**hdr, "Connection": "keep-alive"}, orjson.dumps(
            {"model": "auto", "messages": [{"role": "user", "content": "d"}], "max_tokens": 400, "stream": True})))
        await writer.drain()
        await asyncio.wait_for(reader.read(100), 5)
        writer.transport.abort()
    except (OSError, asyncio.TimeoutError):
        pass
    async with aiohttp.ClientSession() as s:  # and the ordinary client path
        async with s.post(base + "/v1/chat/completions", data=CHAT, headers=hdr) as r:
            await r.read()


def scan_log(path: Path, secrets_: dict[str, str]) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    found = {name: text.count(value) for name, value in secrets_.items() if value and value in text}
    auth_lines = [line[:300] for line in text.splitlines()
                  if re.search(r"authorization\W{1,4}(bearer|basic|token)?\s*\S", line, re.IGNORECASE)]
    bearer_lines = [line[:300] for line in text.splitlines() if re.search(r"\bbearer\s+\S", line, re.IGNORECASE)]
    return {"log_bytes": len(text), "log_lines": text.count("\n"), "secrets_found": found,
            "access_lines": text.count('"logger":"prefixlb.access"'),
            "authorization_value_lines": auth_lines[:5], "authorization_value_count": len(auth_lines),
            "bearer_value_count": len(bearer_lines), "bearer_value_lines": bearer_lines[:5]}


def refuse_credential_urls(urls: list[str], cred_url: str, secret: str, workdir: Path) -> list[dict]:
    """``prefixlb serve`` with a credential-carrying replica URL, in a config file and as a flag:
    it must exit with a configuration error (exit 2) naming the key, without printing the secret."""
    out = []
    path = write_config({"tiers": [{"name": "default", "replicas": [*urls, cred_url]}],
                         "listen": {"host": "127.0.0.1", "port": 0}})
    for how, argv in (("config file", ["--config", path]),
                      ("--replica flag", ["--replica", urls[0], "--replica", cred_url, "--port", "0"])):
        try:
            p = subprocess.run([sys.executable, "-m", "prefixlb", "serve", *argv], capture_output=True, text=True,
                               timeout=30, check=False)
            text, code = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired:
            text, code = "", "still running after 30 s"
        out.append({"how": how, "exit": code, "secret_in_response": secret in text,
                    "names_key": "replicas[2]" in text or "--replica[1]" in text,
                    "ok": code == 2 and secret not in text})
    os.unlink(path)
    return out


async def run(args: argparse.Namespace) -> dict:
    token = "plb-admin-" + secrets.token_hex(16)
    client_secret = "sk-client-" + secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="prefixlb-security-"))
    log_path = workdir / "prefixlb.log"
    canary = await Canary().start()
    redir = await RedirectingReplica(canary.url).start()
    url_secret = "urlpw" + secrets.token_hex(12)
    fleets = start_emulators(3, time_scale=20, log_path=workdir / "emulate.log")
    balancer = no_token = None
    try:
        urls, cred_url = fleets[0].urls[:2], fleets[0].urls[2]
        # a replica URL carrying credentials (userinfo), as operators sometimes write them: refused
        # at load, by the config file and by the flag, without the secret in the error
        cred_url = cred_url.replace("http://", f"http://svc:{url_secret}@")
        cred_refusals = await asyncio.to_thread(refuse_credential_urls, urls, cred_url, url_secret, workdir)
        config = {
            "tiers": [{"name": "default", "replicas": urls},
                      {"name": "redir", "model": RedirectingReplica.MODEL, "replicas": [redir.url]}],
            "routing": {"default_tier": "default"},
            "admin": {"token_env": "PREFIXLB_ADMIN_TOKEN"},
            "health": {"interval_s": 0.5},
        }
        # started from a thread: the redirecting replica and the canary live on this event loop
        balancer = await asyncio.to_thread(
            start_balancer, config, args=["--log-format", "json", "--access-log", "--log-level", "debug"],
            env={"PREFIXLB_ADMIN_TOKEN": token}, log_path=log_path, want_healthy=3)
        port = int(balancer.url.rsplit(":", 1)[1])
        auth = {"Authorization": f"Bearer {token}"}
        _, before = await raw(port, req("GET", "/admin/replicas", auth))

        admin_rows, wrong_used = await admin_checks(port, token, canary.url)
        bypass_rows = await bypass_checks(port, token)
        _, after = await raw(port, req("GET", "/admin/replicas", auth))
        state_before = _replica_state(before)
        state_after = _replica_state(after)
        token_rows = await with_token_checks(port, token)
        steer_rows = await steering_checks(port, canary)
        await secret_traffic(port, balancer.url, token, client_secret)
        # the same URL through the admin API at run time: refused too
        cred_status, cred_out = await raw(port, req("POST", "/admin/replicas", [*auth.items(), *JSON.items()],
                                                    orjson.dumps({"url": cred_url, "tier": "default"})))
        cred_refusals.append({"how": "POST /admin/replicas", "status": cred_status,
                              "secret_in_response": url_secret.encode() in cred_out,
                              "ok": 400 <= cred_status < 500 and url_secret.encode() not in cred_out})
        # a second balancer with no admin token configured: the admin API is disabled
        no_token = await asyncio.to_thread(start_balancer, {"tiers": [{"name": "default", "replicas": urls}]},
                                           log_path=workdir / "prefixlb-no-token.log",
                                           env={"PREFIXLB_ADMIN_TOKEN": ""})
        nt_port = int(no_token.url.rsplit(":", 1)[1])
        disabled_rows = []
        for method, path, body in ADMIN_ROUTES:
            for name, hdrs in (("no credentials", []), ("some bearer token", [("Authorization", f"Bearer {token}")])):
                status, _ = await raw(nt_port, req(method, path, [*hdrs, *JSON.items()], body))
                disabled_rows.append({"route": f"{method} {path}", "credentials": name, "status": status,
                                      "ok": status == 401})
        await asyncio.sleep(1.5)  # health checks and scrapes of the replicas run meanwhile
        metrics_text = (await raw(port, req("GET", "/metrics")))[1]
        replicas_text = (await raw(port, req("GET", "/admin/replicas", auth)))[1]
    finally:
        if balancer is not None:
            balancer.stop()  # SIGTERM: the log is complete after it exits
        if no_token is not None:
            no_token.stop()
        for f in fleets:
            f.stop()
        await redir.stop()
    await canary.stop()
    to_find = {"admin token": token, "client Authorization secret": client_secret}
    for i, w in enumerate(sorted(set(wrong_used))):
        for piece in w.split():
            if len(piece) >= 12 and piece not in ("Bearer", "Basic", "Token"):
                to_find[f"wrong credential {i}"] = piece
    logs = scan_log(log_path, to_find)
    logs_nt = scan_log(workdir / "prefixlb-no-token.log", to_find)
    responses_leak = token.encode() in metrics_text or token.encode() in replicas_text
    url_logs = scan_log(log_path, {"replica URL password": url_secret})
    url_exposed = {"log": url_logs["secrets_found"].get("replica URL password", 0),
                   "metrics": url_secret.encode() in metrics_text,
                   "admin_replicas": url_secret.encode() in replicas_text}

    checks = [
        check("admin routes refuse without the token (every route x every wrong credential)",
              f"{sum(r['ok'] for r in admin_rows)}/{len(admin_rows)} answered 401", "all 401",
              all(r["ok"] for r in admin_rows)),
        check("path spellings dodging /admin/ never answer 2xx or leak the replica list",
              f"{sum(r['ok'] for r in bypass_rows)}/{len(bypass_rows)} refused", "all refused",
              all(r["ok"] for r in bypass_rows)),
        check("admin API disabled without a configured token",
              f"{sum(r['ok'] for r in disabled_rows)}/{len(disabled_rows)} answered 401", "all 401",
              all(r["ok"] for r in disabled_rows)),
        check("refused admin calls changed nothing (replica set, drain states)",
              "unchanged" if state_before == state_after else f"{state_before} -> {state_after}", "unchanged",
              state_before == state_after and bool(state_before)),
        check("with the right token every route is reachable (the route list is real)",
              f"{sum(r['ok'] for r in token_rows)}/{len(token_rows)} not 401", "all not 401",
              all(r["ok"] for r in token_rows)),
        check("no request reaches an upstream outside the replicas (canary connections)",
              f"{len(canary.hits)} connections to the canary over {len(steer_rows)} attempts", "0",
              not canary.hits),
        check("admin token, wrong tokens and client secrets absent from the logs",
              "none found" if not logs["secrets_found"] and not logs_nt["secrets_found"]
              else f"{logs['secrets_found']} {logs_nt['secrets_found']}", "none", not logs["secrets_found"]
              and not logs_nt["secrets_found"]),
        check("no authorization / bearer values in the logs",
              f"{logs['authorization_value_count']} authorization lines, {logs['bearer_value_count']} bearer lines",
              "0", logs["authorization_value_count"] == 0 and logs["bearer_value_count"] == 0),
        check("the log was written (access log on: proxied requests logged)",
              f"{logs['log_lines']} lines, {logs['access_lines']} access lines", "> 0 access lines",
              logs["access_lines"] > 0),
        check("the admin token is absent from /metrics and /admin/replicas", "absent" if not responses_leak
              else "present", "absent", not responses_leak),
        check("a replica URL with credentials is refused (config file, --replica, admin API), the secret "
              "never echoed", "; ".join(f"{r['how']}: {r.get('exit', r.get('status'))}"
                                        f"{', secret echoed' if r['secret_in_response'] else ''}"
                                        for r in cred_refusals),
              "all refused, secret absent", all(r["ok"] for r in cred_refusals)
              and not any(url_exposed.values())),
    ]
    extra: list[dict] = []
    report = {
        "benchmark": "reliability_security", "machine": machine(), "command": command_line("security.py"),
        "setup": {"replicas": "2 emulated (prefixlb emulate) + 1 redirecting fake replica (tier redir)",
                  "balancer_flags": "--config FILE --log-format json --access-log --log-level debug",
                  "admin_token_source": "PREFIXLB_ADMIN_TOKEN (admin.token_env)"},
        "checks": checks, "ok": all(c["ok"] for c in checks), "extra_probes": extra,
        "replica_url_password": url_exposed, "credential_url_refusals": cred_refusals,
        "admin": admin_rows, "bypass": bypass_rows, "admin_disabled": disabled_rows, "with_token": token_rows,
        "steering": steer_rows, "canary_hits": canary.hits, "redirecting_replica_completions": redir.completions,
        "logs": logs, "logs_no_token_balancer": logs_nt,
    }
    if not args.keep_logs:
        for p in workdir.iterdir():
            p.unlink()
        workdir.rmdir()
    else:
        report["log_dir"] = str(workdir)
    return report


def _replica_state(raw_response: bytes) -> list:
    try:
        body = orjson.loads(raw_response.split(b"\r\n\r\n", 1)[1])
    except (IndexError, orjson.JSONDecodeError):
        return []
    return sorted((r.get("url"), r.get("draining")) for r in body if isinstance(r, dict))


def to_markdown(report: dict) -> str:
    lines = header_md("reliability: security", report)
    lines += checks_md(report["checks"])
    if report.get("extra_probes"):
        lines += ["", "Beyond the issue's list (reported, not part of pass/fail):", ""]
        lines += checks_md(report["extra_probes"])
    lines += ["", "Steering attempts (status the client got; connections the canary saw):", "",
              "| attempt | status | canary hits |", "|---|---|---|"]
    for r in report["steering"]:
        lines.append(f"| {r['attempt']} | {r['status']} | {r['canary_hits']} |")
    bad = [r for r in report["admin"] + report["bypass"] + report["admin_disabled"] if not r["ok"]]
    if bad:
        lines += ["", "Admin requests not refused:", ""] + [f"- `{r}`" for r in bad[:20]]
    lines += ["", f"Log scanned: {report['logs']['log_lines']} JSON lines ({report['logs']['log_bytes']:,} bytes)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="same checks (all fast); results go to *_quick files")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the balancer's log files and print where")
    args = ap.parse_args(argv)
    report = asyncio.run(run(args))
    write_report("security", report, to_markdown(report), args.out, args.quick)
    print(to_markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
