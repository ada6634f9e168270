"""The light client installs into an empty venv without torch or ray, and its CLI runs."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


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
