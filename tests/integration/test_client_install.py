"""The light client installs into an empty venv without torch or ray, and its CLI runs; the
subcommands that need the server side (serve, eval) say so instead of failing on an import."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "clients" / "python"


def test_client_installs_alone(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(CLIENT)],
                   check=True, timeout=600)
    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert "biprompt-client" in names and "httpx" in names
    assert not names & {"torch", "ray", "biprompt-serve"}, names
    probe = ("import sys, biprompt_client; from biprompt_client import BiPromptClient; "
             "print(sorted(m for m in ('torch', 'ray', 'biprompt') if m in sys.modules))")
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    help_text = subprocess.run([env_dir / "bin" / "biprompt", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "segment" in help_text and "batch" in help_text

    cli = env_dir / "bin" / "biprompt"
    run = {"capture_output": True, "text": True, "cwd": tmp_path, "timeout": 120}
    served = subprocess.run([cli, "serve", "--config", REPO / "configs/serve/local-cpu.yaml"],
                            **run)
    assert served.returncode == 2
    assert "the server needs the full biprompt-serve install" in served.stderr
    evaluated = subprocess.run([cli, "eval", "shapes", "--n", "1"], **run)
    assert evaluated.returncode == 2
    assert "`biprompt eval` needs the full biprompt-serve install" in evaluated.stderr
