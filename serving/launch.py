"""Starting and stopping the Serve app.

    python -m serving.launch [--config configs/serve/local-cpu.yaml]   # what `biprompt serve` runs

`main` becomes `serve run <config>` (exec, so Ctrl-C and the exit status are serve's own) with
Serve's throughput-optimized settings (deployments.driver.apply_serve_env). `start_app` and
`stop_app` run the app inside this process instead, on a local Ray of its own, for drivers such
as the demo.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from deployments.driver import apply_serve_env

DEFAULT_CONFIG = "configs/serve/local-cpu.yaml"


def find_serve() -> str | None:
    """The `serve` executable of this interpreter's environment, else the first one on PATH."""
    beside = Path(sys.executable).with_name("serve")
    return str(beside) if beside.is_file() else shutil.which("serve")


def serve_run_command(config: str | Path, serve: str,
                      environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The `serve run` command line and its environment: `environ` (default os.environ) with the
    throughput-optimized settings added where not already set."""
    env = dict(os.environ if environ is None else environ)
    apply_serve_env(env)
    return [serve, "run", str(config)], env


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.launch",
                                 description="Run the Serve app in the foreground.")
    ap.add_argument("--config", default=DEFAULT_CONFIG,
                    help=f"Serve config YAML (default {DEFAULT_CONFIG})")
    args = ap.parse_args(argv)
    config = Path(args.config)
    if not config.is_file():
        print(f"error: no serve config at {config} (run from the repo root, or pass --config)",
              file=sys.stderr)
        return 2
    serve = find_serve()
    if serve is None:
        print("error: `serve` (Ray Serve) is not installed here: the server needs the full "
              "biprompt-serve install (make test / make demo build it)", file=sys.stderr)
        return 2
    cmd, env = serve_run_command(config, serve)
    os.execve(cmd[0], cmd, env)  # this process becomes `serve run`: its signals and exit status


# --- in this process, for drivers (the demo) ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(profile: str | Path, cache_url: str | None, *, name: str = "demo",
              num_cpus: int = 2) -> tuple[str, float]:
    """Start local Ray and Serve on a free port and run the app built from the model profile.
    Returns the base URL and the seconds it took."""
    import ray
    from ray import serve

    from graph import build_app

    t = time.perf_counter()
    apply_serve_env()
    # address="local": a Ray of its own, never a cluster someone started on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model_profile": str(profile), "cache_url": cache_url}), name=name,
              route_prefix="/")
    return f"http://127.0.0.1:{port}", time.perf_counter() - t


def stop_app() -> None:
    """Shut down Serve and the local Ray that start_app began."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
