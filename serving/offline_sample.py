"""A sample requests file for the offline batch: ShapesRef scenes as PNG files and clicks with
referring expressions on them, in the format `biprompt batch` and `biprompt offline` read.

    python -m serving.offline_sample out/offline/sample --images 20 --per-image 5
    python -m serving.offline out/offline/sample/requests.jsonl --out out/offline/results.jsonl

Item i is on image i % images (the images interleave, as a real dataset's lines may). With
`--bad`, two extra lines show error rows: one names a missing file, one clicks outside its image.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from biprompt.data.shapes_ref import generate_scene, sample_from_scene


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_sample(folder: str | Path, images: int, per_image: int, seed: int = 0,
                 size: tuple[int, int] = (256, 256), bad: bool = False) -> Path:
    """`images` scenes of `size` (h, w) under `folder`/images and `images * per_image` requests
    in `folder`/requests.jsonl (image paths relative to it). Returns the requests file."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(images):
        scene = generate_scene(rng, *size)
        (folder / "images" / f"scene{k:05d}.png").write_bytes(png_bytes(scene.image))
        scenes.append(scene)
    lines = []
    for i in range(images * per_image):
        k = i % images
        s = sample_from_scene(scenes[k], rng)
        lines.append({"id": f"item{i:06d}", "image": f"images/scene{k:05d}.png",
                      "points": [list(s.point_index)], "text": s.expression})
    if bad:
        h, w = size
        lines.append({"id": "missing-image", "image": "images/no-such-file.png",
                      "points": [[10, 10]], "text": "the red circle"})
        lines.append({"id": "click-outside", "image": "images/scene00000.png",
                      "points": [[w + 5, h + 5]], "text": "the red circle"})
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.offline_sample",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="256x256", help="WxH")
    ap.add_argument("--bad", action="store_true", help="add a missing image and a bad click")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    path = write_sample(args.folder, args.images, args.per_image, args.seed, (h, w), args.bad)
    print(f"wrote {args.images} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
