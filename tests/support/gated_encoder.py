"""An ImageEncoder deployment that a test can hold busy, for backpressure tests that don't race.

While the file ``hold`` exists in the folder named by ``$BIPROMPT_TEST_GATE`` (set before
``ray.init``, so every replica inherits it), each call writes ``held`` there and waits; removing
``hold`` lets it through. Otherwise it is the real ImageEncoder, call for call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from deployments.encoder import ImageEncoder

GATE_ENV = "BIPROMPT_TEST_GATE"


class GatedImageEncoder(ImageEncoder):
    async def __call__(self, *args, **kwargs):
        folder = os.environ.get(GATE_ENV)
        if folder:
            hold = Path(folder) / "hold"
            if hold.exists():
                (Path(folder) / "held").touch()
                while hold.exists():  # the replica's event loop stays free meanwhile
                    await asyncio.sleep(0.01)
        return await super().__call__(*args, **kwargs)


class EncoderGate:
    """The test's side of the gate: `closed()` holds every encoder call made inside it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @contextlib.contextmanager
    def closed(self):
        (self.folder / "held").unlink(missing_ok=True)
        (self.folder / "hold").touch()
        try:
            yield self
        finally:
            (self.folder / "hold").unlink(missing_ok=True)

    def wait_until_held(self, timeout_s: float = 60.0) -> None:
        """Until a call is waiting at the gate (bounded: a clear failure, not a hang)."""
        deadline = time.monotonic() + timeout_s
        while not (self.folder / "held").exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no encoder call reached the gate in {timeout_s} s: is "
                                     f"${GATE_ENV} set in the replicas' environment?")
            time.sleep(0.01)
