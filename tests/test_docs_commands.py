"""The commands in README.md and docs/*.md run as written: every ``python -m X`` / ``torchrun -m X``
names a module that exists, every script path exists, and the cheap ones (``--help``, ``--cfg``,
``--dry``, the models' parameter counts) are run from the checkout and succeed."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = ("--help", "--cfg", "--dry")


def commands() -> list[tuple[str, str]]:
    """(where, command) for each python/torchrun command: fenced bash lines (continuations joined)
    and inline `code` spans."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                out.append((doc.name, line.split(" #")[0].strip()))
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            out.append((doc.name, span.strip()))
    keep = []
    for where, cmd in out:
        m = re.search(r"(?:^|\s)((?:OMP_NUM_THREADS=\d+ )?(?:python3? |torchrun ).*)", cmd)
        if m and ("-m " in m.group(1) or ".py" in m.group(1)) and "..." not in m.group(1):
            keep.append((where, m.group(1)))
    return keep


def _module_or_script(cmd: str):
    words = shlex.split(cmd)
    if "-m" in words:
        return "module", words[words.index("-m") + 1]
    script = next((w for w in words if w.endswith(".py")), None)
    return ("script", script) if script else (None, None)


def test_the_docs_have_commands():
    cmds = commands()
    assert len(cmds) > 20 and any("longseq.train" in c for _, c in cmds)


def test_every_module_and_script_named_exists():
    bad = []
    for where, cmd in commands():
        kind, name = _module_or_script(cmd)
        if kind == "module" and importlib.util.find_spec(name) is None:
            bad.append(f"{where}: {cmd}: no module {name}")
        if kind == "script" and not (ROOT / name).is_file():
            bad.append(f"{where}: {cmd}: no file {name}")
    assert bad == []


def _cheap() -> list[str]:
    cheap = {cmd for _, cmd in commands()
             if any(f in shlex.split(cmd) for f in CHEAP) or re.search(r"-m longseq\.models\.\w+ --preset", cmd)}
    return sorted(cheap)


@pytest.mark.parametrize("cmd", _cheap())
def test_cheap_command_runs(cmd):
    words = shlex.split(cmd)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    while "=" in words[0] and not words[0].startswith("-"):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    if words[0] in ("python", "python3"):
        words[0] = sys.executable
    elif words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    p = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}"


def test_the_overrides_in_the_docs_compose():
    """Every ``-m longseq.train`` / ``-m longseq.benchmarks.simulate`` command's key=value overrides
    compose (a key renamed or removed fails here)."""
    from longseq.benchmarks import simulate
    from longseq.train.config import load_config
    n = 0
    for where, cmd in commands():
        kind, name = _module_or_script(cmd)
        words = shlex.split(cmd)
        overrides = [w for w in words[words.index("-m") + 2:] if "=" in w and not w.startswith("-")] \
            if kind == "module" else []
        if name == "longseq.train":
            load_config(overrides)
        elif name == "longseq.benchmarks.simulate":
            simulate.load_config(overrides)
        else:
            continue
        n += bool(overrides)
    assert n >= 5
