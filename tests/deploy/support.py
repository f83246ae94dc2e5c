"""Readers for what deploy/ holds: strict YAML, Dockerfile instructions, .dockerignore, PromQL.

Small on purpose: enough of each format to check deploy/ against the code, nothing more. No
network, no Docker daemon, no cluster.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def run(coro: Awaitable, timeout: float = 60.0):
    """Run a coroutine in a fresh event loop, bounded by ``timeout`` seconds."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# -- YAML ----------------------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolves `<<` merge keys first
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml_docs(path: Path) -> list[Any]:
    """Every non-empty document of a (multi-document) YAML file, duplicate keys refused."""
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]


def load_yaml(path: Path) -> Any:
    (doc,) = load_yaml_docs(path)
    return doc


def iter_yaml_files() -> Iterator[Path]:
    """Every YAML file under deploy/."""
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yaml", ".yml") and path.is_file():
            yield path


def one(by_kind: dict[str, list[dict]], kind: str) -> dict:
    """The single object of ``kind`` among the manifests."""
    objs = by_kind.get(kind, [])
    assert len(objs) == 1, f"expected exactly one {kind} in deploy/k8s, found {len(objs)}"
    return objs[0]


# -- Dockerfile ----------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int

    def flags(self) -> dict[str, str]:
        """``--name=value`` flags at the start of the arguments (COPY --from=..., RUN --mount=...)."""
        out = {}
        for tok in shlex.split(self.args):
            if not tok.startswith("--"):
                break
            name, _, value = tok[2:].partition("=")
            out.setdefault(name, value)
        return out

    def exec_form(self) -> list[str] | None:
        """The JSON-array form of CMD/ENTRYPOINT/RUN (after any flags), or None for shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3:] if "CMD" in text else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults visible in this stage

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]
    directives: dict[str, str]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} (stages: {[s.name for s in self.stages]})")

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def _substitute(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Logical instructions grouped by stage, with ARG defaults substituted in FROM and USER."""
    lines = path.read_text().splitlines()
    directives: dict[str, str] = {}
    logical: list[tuple[int, str]] = []
    buf, start, in_header = "", 0, True
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if in_header:
            m = re.match(r"#\s*(\w+)\s*=\s*(\S+)\s*$", stripped)
            if m:
                directives[m.group(1).lower()] = m.group(2)
                continue
            in_header = False
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments (also inside continuations) and blank lines
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    assert not buf, f"{path}: the last instruction ends with a line continuation"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for n, text in logical:
        keyword, _, rest = text.partition(" ")
        ins = Instruction(keyword.upper(), rest.strip(), n)
        if ins.keyword == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip()
            continue
        if ins.keyword == "FROM":
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            base = _substitute(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
            continue
        assert stages, f"{path}:{n}: {ins.keyword} before the first FROM"
        stage = stages[-1]
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            name = name.strip()
            stage.args[name] = default.strip() or global_args.get(name, "")
        stage.instructions.append(ins)
    return Dockerfile(global_args, stages, directives)


def resolve(stage: Stage, text: str) -> str:
    return _substitute(text, stage.args)


# -- .dockerignore -------------------------------------------------------------------------------


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as an anchored regex."""
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.index("]", i)
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


class DockerIgnore:
    """Which paths of the build context Docker sends, by the last matching pattern."""

    def __init__(self, path: Path) -> None:
        self.rules: list[tuple[bool, re.Pattern[str], str]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = line[1:] if negate else line
            pat = pat.strip().lstrip("/").rstrip("/")
            self.rules.append((negate, _glob_to_regex(pat), line))

    @property
    def has_exceptions(self) -> bool:
        return any(neg for neg, _, _ in self.rules)

    def excluded(self, rel: str) -> bool:
        """True if ``rel`` (posix path relative to the context) or one of its parents is excluded."""
        parts = rel.split("/")
        prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
        result = False
        for negate, rx, _ in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result

    def context_files(self, root: Path) -> Iterator[str]:
        """Files Docker would send from ``root``; excluded directories are not descended into."""
        for path in sorted(root.iterdir()):
            yield from self._walk(root, path)

    def _walk(self, root: Path, path: Path) -> Iterator[str]:
        rel = path.relative_to(root).as_posix()
        if self.excluded(rel) and not self.has_exceptions:
            return
        if path.is_dir() and not path.is_symlink():
            for child in sorted(path.iterdir()):
                yield from self._walk(root, child)
        elif not self.excluded(rel):
            yield rel


# -- PromQL --------------------------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan", "atan2"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*(?:\"(?:[^\"\\]|\\.)*\"|'[^']*')")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass
class PromQL:
    expr: str
    metrics: set[str]  # series names referenced (metric_bucket, metric_total, ...)
    matchers: dict[str, set[str]]  # series name -> label names in its {...} matchers
    grouping: set[str]  # label names in by/without/on/ignoring/group_* clauses


def parse_promql(expr: str) -> PromQL:
    """The series names and label names an expression uses (a lexer, not a full parser)."""
    matchers: dict[str, set[str]] = {}
    for m in _SELECTOR.finditer(expr):
        if m.group(1) and m.group(1) not in _KEYWORDS:
            matchers.setdefault(m.group(1), set()).update(x.group(1) for x in _MATCHER.finditer(m.group(2)))
    grouping = {lab.strip() for m in _GROUPING.finditer(expr) for lab in m.group(2).split(",") if lab.strip()}
    s = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers (strings with $vars inside)
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = _GROUPING.sub(" ", s)
    s = re.sub(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'", " ", s)  # string arguments (label_replace, ...)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # dashboard variables outside selectors
    s = re.sub(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", " ", s)  # numbers
    metrics = set()
    for m in _IDENT.finditer(s):
        name = m.group(0)
        if name.lower() in _KEYWORDS:
            continue
        if re.match(r"\s*\(", s[m.end():]):  # a function call
            continue
        metrics.add(name)
    return PromQL(expr, metrics, matchers, grouping)


def label_values_query(query: str) -> tuple[str | None, str]:
    """Grafana's ``label_values(selector, label)`` -> (selector or None, label)."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query)
    assert m, f"not a label_values() query: {query!r}"
    return m.group(1), m.group(2)


def exposition_series(families: list) -> dict[str, tuple[str, str]]:
    """Every series name a scrape exposes -> (family name, type), from prometheus_client's parser.

    Names come from the type, so a family with no samples yet still counts (counters
    ``_total``/``_created``, histograms ``_bucket``/``_sum``/``_count``/``_created``, ...).
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gauge": ("",),
        "unknown": ("",),
    }
    out: dict[str, tuple[str, str]] = {}
    for fam in families:
        for suffix in suffixes.get(fam.type, ("",)):
            out[fam.name + suffix] = (fam.name, fam.type)
        for sample in fam.samples:
            out[sample.name] = (fam.name, fam.type)
    return out
