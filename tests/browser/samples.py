"""The ShapesRef scenes bundled with the demo page (deployments/web/static/samples/).

    .venv/bin/python -m tests.browser.samples     # (re)writes the PNGs and samples.json

test_samples.py fails while the committed files differ from what this draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from biprompt.data.shapes_ref import Scene, generate_scene

SAMPLES_DIR = Path(__file__).resolve().parents[2] / "deployments/web/static/samples"
MANIFEST = SAMPLES_DIR / "samples.json"


@dataclass(frozen=True)
class Bundled:
    name: str
    seed: int
    height: int
    width: int
    expression: str  # suggested in the page (the text field's placeholder)

    @property
    def file(self) -> str:
        return f"{self.name}.png"

    def scene(self) -> Scene:
        # noise-free: a few KB of PNG each (noisy ones take 150 KB), and the demo model does as
        # well on them
        return generate_scene(np.random.default_rng(self.seed), self.height, self.width,
                              noise=False)


BUNDLED = (
    Bundled("blue-circles", 2, 240, 320, "the small blue circle"),
    Bundled("square-and-circle", 11, 256, 256, "the red square"),
    Bundled("triangle-and-circles", 0, 240, 320, "the blue triangle"),
    Bundled("yellow-circles", 7, 240, 320, "the leftmost yellow circle"),
)


def manifest() -> list[dict]:
    return [{"file": b.file, "title": b.name.replace("-", " "), "expression": b.expression,
             "width": b.width, "height": b.height} for b in BUNDLED]


def write(folder: Path = SAMPLES_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for b in BUNDLED:
        Image.fromarray(b.scene().image).save(folder / b.file, optimize=True)
    (folder / MANIFEST.name).write_text(json.dumps(manifest(), indent=2) + "\n")


if __name__ == "__main__":
    write()
    print(f"wrote {len(BUNDLED)} samples and {MANIFEST.name} to {SAMPLES_DIR}")
