"""serving.launch: what `biprompt serve` runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving.launch import find_serve, serve_run_command

REPO = Path(__file__).resolve().parents[2]


def test_serve_run_command_adds_the_serve_env():
    cmd, env = serve_run_command("configs/serve/local-cpu.yaml", "/bin/serve", {"HOME": "/h"})
    assert cmd == ["/bin/serve", "run", "configs/serve/local-cpu.yaml"]
    assert env["HOME"] == "/h"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert int(env["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 1 << 30


def test_serve_run_command_keeps_an_explicit_choice():
    _, env = serve_run_command("c.yaml", "serve", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_find_serve_prefers_this_environment():
    beside = Path(sys.executable).with_name("serve")
    assert beside.is_file()  # the full install has Ray Serve's CLI
    assert find_serve() == str(beside)


def test_launch_execs_serve_run(tmp_path):
    """main becomes `serve run <config>` with the serve env; a stand-in `serve` reports both."""
    fake = tmp_path / "serve"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "mode: $RAY_SERVE_THROUGHPUT_OPTIMIZED"\n'
                    "exit 7\n")
    fake.chmod(0o755)
    config = tmp_path / "app.yaml"
    config.write_text("applications: []\n")
    code = ("import sys, serving.launch as launch; "
            f"launch.find_serve = lambda: {str(fake)!r}; "
            "sys.exit(launch.main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_SERVE_THROUGHPUT_OPTIMIZED"}
    proc = subprocess.run([sys.executable, "-c", code, "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7  # serve's own status: the launcher exec'd it
    assert proc.stdout.splitlines() == [f"argv: run {config}", "mode: 1"]


def test_launch_missing_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serving.launch", "--config",
                           str(tmp_path / "nope.yaml")], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no serve config at" in proc.stderr


def test_cli_serve_runs_serve_through_the_launcher(tmp_path):
    """biprompt serve -> python -m serving.launch -> serve run <config>: a config that serve
    refuses at once comes back as serve's error and exit status (no Ray is started)."""
    from biprompt_client.cli import main as cli_main

    bad = tmp_path / "broken.yaml"
    bad.write_text("applications: [unclosed\n")
    code = ("import sys; from biprompt_client.cli import main; rc = main(sys.argv[1:]); "
            "assert not {'serving', 'deployments', 'biprompt', 'ray'} & set(sys.modules); "
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "serve", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert str(bad) in proc.stderr
    assert cli_main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_cli_serve_without_server_package(monkeypatch, capsys, tmp_path):
    from biprompt_client.cli import main as cli_main

    config = tmp_path / "app.yaml"
    config.write_text("applications: []\n")
    monkeypatch.setitem(sys.modules, "serving", None)  # find_spec("serving") -> None
    assert cli_main(["serve", "--config", str(config)]) == 2
    assert "the server needs the full biprompt-serve install" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "found"), [
    ("serving.launch", True), ("biprompt.evaluate", True), ("biprompt.no_such_module", False),
    ("no_such_package_here.launch", False), ("graph.no_such_module", False),
])
def test_module_installed(name, found):
    from biprompt_client.cli import module_installed

    assert module_installed(name) is found


def test_module_installed_imports_nothing():
    code = ("import sys; from biprompt_client.cli import module_installed; "
            "assert module_installed('biprompt.evaluate') and module_installed('serving.launch'); "
            "sys.exit(sorted({'biprompt', 'serving', 'torch'} & set(sys.modules)) or 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
