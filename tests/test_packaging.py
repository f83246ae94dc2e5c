"""Install-time promises: the extension builds, the fallback works, the entry points exist."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import prefixlb
from prefixlb import index

ROOT = Path(__file__).resolve().parent.parent


def run(args, env=None, cwd=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_native_is_active_when_built():
    if os.environ.get("PREFIXLB_REQUIRE_NATIVE") == "1":
        assert index.NATIVE, "CI requires the C extension to be built and active"
        # the tier classifier's extension too: without it its C == Python tests would skip
        from prefixlb.routing.classifier import _tiernet  # noqa: F401
    if not hasattr(index, "PrefixIndexC"):
        pytest.skip("C extension not built here")
    assert index.NATIVE == (os.environ.get("PREFIXLB_NATIVE", "1") != "0")
    assert index.PrefixIndex is (index.PrefixIndexC if index.NATIVE else index.PrefixIndexPy)


def test_env_switch_forces_the_reference():
    code = "import prefixlb.index as i; print(i.NATIVE, i.IMPLEMENTATION, i.PrefixIndex.__name__)"
    out = run([sys.executable, "-c", code], env={"PREFIXLB_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "python", "PrefixIndexPy"]


def test_python_dash_m_and_console_script():
    out = run([sys.executable, "-m", "prefixlb", "info"])
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["version"] == prefixlb.__version__
    assert info["native"] == index.NATIVE
    script = Path(sys.executable).with_name("prefixlb")
    if script.exists():
        assert run([str(script), "--version"]).stdout.strip() == f"prefixlb {prefixlb.__version__}"


@pytest.mark.slow
def test_without_a_compiler_the_wheel_installs_and_runs_on_the_reference(tmp_path):
    """CC=false makes the build fail; the wheel must still be made, import, and say so once."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a clean copy: no build/ cache and no in-place .so to reuse
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info")
    for name in ("prefixlb", "native"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    wheel_dir = tmp_path / "wheels"
    out = run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(src)],
        env={"CC": "false", "PIP_NO_INDEX": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "could not be built" in out.stdout + out.stderr
    (wheel,) = wheel_dir.glob("prefixlb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.endswith((".so", ".pyd")) for n in names)
    assert "prefixlb/index/_reference.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING);"
        "import prefixlb.index as i; import prefixlb.index as j;"
        "ix = i.PrefixIndex(4); ix.insert(0, i.block_hashes(b'x'*128)); print(i.NATIVE, ix.match(i.block_hashes(b'x'*128)))"
    )
    out = run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "{0:", "2}"]
    assert out.stderr.count("C extension not available") == 1
