"""The `biprompt` command: serve, segment, embed, batch, offline, eval.

    biprompt serve [--config configs/serve/local-cpu.yaml]
    biprompt segment photo.jpg --point 420,310 --text "the dog on the left" --overlay o.png
    biprompt embed 'images/*.jpg'
    biprompt batch requests.jsonl --out results.jsonl [--coco coco_results.json]
    biprompt offline requests.jsonl --out results.jsonl   (Ray Data, no server; full install only)
    biprompt eval shapes --n 500 --seed 12345 --json scores.json   (offline; full install only)

`serve`, `offline` and `eval` run the server side (python -m serving.launch, python -m
serving.offline, python -m biprompt.evaluate) in a child process of this interpreter: this package
never imports it.

The server URL comes from --url or BIPROMPT_URL, the key from --api-key or BIPROMPT_API_KEY.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.machinery import PathFinder
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BiPromptClientError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def _pair(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return values


def _client(args):
    from .client import BiPromptClient

    return BiPromptClient(args.url, api_key=args.api_key, timeout=args.timeout, wire=args.wire)


def module_installed(name: str) -> bool:
    """Whether the dotted module `name` could be imported here, found without importing any of
    it (importing `biprompt` to look for `biprompt.evaluate` would load torch)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    for part in rest:
        if spec is None or not spec.submodule_search_locations:
            return False
        spec = PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec is not None


def run_foreground(cmd: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run `cmd` and return its exit status; 130 after Ctrl-C, once the child (which had the same
    SIGINT) has shut down."""
    with subprocess.Popen(list(cmd), env=env) as proc:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            return 130


# --- serve ----------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    """`python -m serving.launch` in a child process: the server side stays out of the client."""
    config = Path(args.config)
    if not config.is_file():
        print(f"error: no serve config at {config} (run from the repo root, or pass --config)",
              file=sys.stderr)
        return 2
    if not module_installed("serving.launch"):
        print("error: `serve` (Ray Serve) is not installed here: the server needs the full "
              "biprompt-serve install (make test / make demo build it)", file=sys.stderr)
        return 2
    return run_foreground([sys.executable, "-m", "serving.launch", "--config", str(config)])


# --- segment --------------------------------------------------------------------------------


def _is_image_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text) and \
        not Path(text).exists()


def _reference_arg(args) -> dict | None:
    """--reference IMAGE (a file or an image id) with --reference-mask PNG, --reference-point
    and/or --reference-box -> segment(reference=...)."""
    ref = getattr(args, "reference", None)
    given = [args.reference_mask, args.reference_point, args.reference_box]
    if ref is None:
        if any(given):
            raise ValueError("--reference-mask/-point/-box need --reference IMAGE")
        return None
    out: dict = {"image_id": ref} if _is_image_id(ref) else {"image": ref}
    if args.reference_mask:
        if args.reference_point or args.reference_box:
            raise ValueError("give --reference-mask, or --reference-point/--reference-box")
        out["mask"] = np.asarray(Image.open(args.reference_mask).convert("L")) >= 128
    elif args.reference_point or args.reference_box:
        out.update(points=args.reference_point, box=args.reference_box)
    else:
        raise ValueError("--reference needs the object: --reference-mask, --reference-point "
                         "or --reference-box")
    return out


def cmd_segment(args) -> int:
    points = args.point or []
    labels = args.label if args.label else None
    if labels is not None and len(labels) != len(points):
        print(f"error: {len(labels)} --label for {len(points)} --point", file=sys.stderr)
        return 2
    try:
        reference = _reference_arg(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        # an image id instead of a file: a refinement click on an image the server has
        image = None if _is_image_id(args.image) else args.image
        res = client.segment(image, image_id=None if image else args.image,
                             points=points or None, labels=labels, box=args.box,
                             text=args.text, mode=args.mode,
                             return_candidates=args.candidates,
                             mask_input_id=args.mask_input_id, logits="id",
                             reference=reference)
    mask = res.mask
    if args.out:
        Image.fromarray(mask.astype(np.uint8) * 255).save(args.out)
    if args.overlay and image is None:
        print("note: --overlay needs the image file, not its id; skipped", file=sys.stderr)
    elif args.overlay:
        from .images import load_image_array
        from .overlay import render_overlay

        rgb = load_image_array(args.image)  # as displayed, like the mask (EXIF orientation)
        render_overlay(rgb, mask, points, labels, args.text).save(args.overlay)
    if args.json:
        print(json.dumps(res.raw))
    else:
        agreement = "-" if res.agreement is None else f"{res.agreement:.3f}"
        if res.expert_agreement is not None:
            agreement += f"  experts agree {res.expert_agreement:.3f}"
        refine = f"\nlogits_id {res.logits_id} (refine: --mask-input-id)" if res.logits_id else ""
        print(f"image_id {res.image_id}{refine}\n"
              f"selected {res.selected}  strategy {res.strategy}  agreement {agreement}\n"
              f"mask {int(mask.sum())} px of {mask.size}  cache {'hit' if res.cache_hit else 'miss'}"
              f"  {res.timings_ms.get('total', 0):.0f} ms")
        for path in filter(None, (args.out, args.overlay if image else None)):
            print(f"wrote {path}")
    return 0


# --- embed ----------------------------------------------------------------------------------


def _expand(pattern: str) -> list[Path]:
    p = Path(pattern)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())


def cmd_embed(args) -> int:
    files = _expand(args.images)
    if not files:
        print(f"error: no images match {args.images!r}", file=sys.stderr)
        return 2
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed below
    counts = {"miss": 0, "hit": 0, "error": 0}
    t0 = time.perf_counter()
    with _client(args) as client, ThreadPoolExecutor(args.concurrency) as pool:
        def one(path: Path) -> dict:
            try:
                info = client.embed_info(path)
                return {"image": str(path), "image_id": info["image_id"], "cache": info["cache"]}
            except BiPromptClientError as exc:
                return {"image": str(path), "error": {"type": exc.type, "message": str(exc)}}

        for rec in tqdm(pool.map(one, files), total=len(files), unit="image",
                        disable=args.no_progress):
            counts[rec.get("cache", "error")] += 1
            if out:
                out.write(json.dumps(rec) + "\n")
            elif "error" in rec:
                print(f"{rec['image']}: {rec['error']['message']}", file=sys.stderr)
    if out:
        out.close()
    dt = time.perf_counter() - t0
    print(f"embedded {len(files)} images in {dt:.1f} s: {counts['miss']} encoded, "
          f"{counts['hit']} already cached, {counts['error']} errors", file=sys.stderr)
    return 1 if counts["error"] else 0


# --- batch ----------------------------------------------------------------------------------

_REQUEST_KEYS = {"image", "image_id", "points", "labels", "point_labels", "box", "text", "mode",
                 "mask_format", "return_candidates", "return_text_mask", "reference",
                 "return_expert_masks"}
_COCO_KEYS = {"coco_image_id", "category_id"}  # for --coco only; never sent


def read_requests(path: Path) -> list[dict]:
    """JSONL lines {"id", "image" (path, relative to the file) or "image_id", "points", ...}."""
    reqs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: {path}:{n}: not JSON ({exc})") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise SystemExit(f"error: {path}:{n}: each line needs an \"id\"")
        rid = str(rec["id"])
        if rid in seen:
            raise SystemExit(f"error: {path}:{n}: duplicate id {rid!r}")
        seen.add(rid)
        unknown = set(rec) - _REQUEST_KEYS - _COCO_KEYS - {"id"}
        if unknown:
            raise SystemExit(f"error: {path}:{n}: unknown keys {sorted(unknown)}")
        if "image" in rec:
            img = Path(rec["image"])
            rec["image"] = img if img.is_absolute() else path.parent / img
        if "point_labels" in rec:
            rec["labels"] = rec.pop("point_labels")
        ref = rec.get("reference")
        if isinstance(ref, dict) and isinstance(ref.get("image"), str):
            img = Path(ref["image"])
            rec["reference"] = {**ref, "image": img if img.is_absolute() else path.parent / img}
        reqs.append(rec)
    return reqs


def done_ids(out: Path) -> set[str]:
    """Ids already in the output; a line cut short by an interruption is dropped."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    ids = set()
    for line in data.decode().splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return ids


def result_line(rid: str, req: dict, result) -> dict:
    if result.ok:
        raw = result.raw
        predicted = next((c.get("predicted_iou") for c in raw.get("candidates") or []
                          if raw["selected"] is not None and c.get("index") == raw["selected"]),
                         None)
        return {"id": rid, "ok": True, "image_id": raw["image_id"], "mask": raw["mask"],
                "selected": raw["selected"], "predicted_iou": predicted,
                "strategy": raw["strategy"], "agreement": raw["agreement"],
                "expert_agreement": raw.get("expert_agreement"), "cache": raw["cache"],
                "text_cache": raw.get("text_cache"), "timings_ms": raw.get("timings_ms", {})}
    exc = result.error
    return {"id": rid, "ok": False, "error": {
        "type": getattr(exc, "type", type(exc).__name__), "message": str(exc),
        "status_code": getattr(exc, "status_code", None),
        "request_id": getattr(exc, "request_id", None)}}


def cmd_batch(args) -> int:
    src, out = Path(args.requests), Path(args.out)
    reqs = read_requests(src)
    if args.coco:
        check_coco_requests(reqs)
    skip = done_ids(out)
    todo = [r for r in reqs if str(r["id"]) not in skip]
    print(f"batch: {len(reqs)} requests, {len(reqs) - len(todo)} already in {out}, "
          f"{len(todo)} to run", file=sys.stderr)
    counts = {"ok": 0, "errors": 0, "hits": 0}
    with open(out, "a") as fh, _client(args) as client:
        def write(i: int, result) -> None:
            line = result_line(str(todo[i]["id"]), todo[i], result)
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            counts["ok" if line["ok"] else "errors"] += 1
            counts["hits"] += line.get("cache") == "hit"

        payloads = [{k: v for k, v in r.items() if k != "id" and k not in _COCO_KEYS}
                    for r in todo]
        t0 = time.perf_counter()
        client.segment_many(payloads, concurrency=args.concurrency,
                            progress=not args.no_progress, on_result=write)
        stats = getattr(client, "last_batch_stats", {}) or {}
    print(summary(counts, stats, time.perf_counter() - t0, len(todo)), file=sys.stderr)
    if args.coco:
        n, mapping = write_coco(reqs, out, Path(args.coco))
        ids = f"; image ids in {mapping}" if mapping else ""
        print(f"coco: wrote {n} results to {args.coco}{ids}", file=sys.stderr)
    return 1 if counts["errors"] else 0


# --- batch --coco ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_coco_requests(reqs: list[dict]) -> None:
    """Before the batch runs: the masks must come back as COCO RLE (the segmentation is written
    as the server sent it), and COCO ids must be integers, image ids on every line or none."""
    for r in reqs:
        fmt = r.get("mask_format", "rle")
        if fmt != "rle":
            raise SystemExit(f"error: --coco needs COCO RLE masks, but request {r['id']!r} sets "
                             f"mask_format {fmt!r}: leave it out (rle is the default)")
        for key in _COCO_KEYS & set(r):
            if not _is_int(r[key]):
                raise SystemExit(f"error: --coco: request {r['id']!r}: {key} must be an "
                                 f"integer, got {r[key]!r}")
    given = sum("coco_image_id" in r for r in reqs)
    if 0 < given < len(reqs):
        raise SystemExit(f"error: --coco: {given} of {len(reqs)} requests carry coco_image_id; "
                         "give it on every line or on none (then images are numbered)")


def coco_score(line: dict) -> float:
    """SAM's predicted IoU of the selected candidate; the agreement when no candidate was
    selected (text mode without a click); 1.0 when neither is known."""
    for key in ("predicted_iou", "agreement"):
        if line.get(key) is not None:
            return float(line[key])
    return 1.0


def write_coco(reqs: list[dict], out: Path, path: Path) -> tuple[int, Path | None]:
    """A COCO results file (what `COCO.loadRes` reads) from every successful line of `out`,
    this run's and earlier ones', in request order. Image ids: each request's coco_image_id, or
    1, 2, ... by the image (path or image_id, as the requests file names it) in order of first
    appearance, written with file name, sha256 and size to `<stem>.images.json` beside `path`.
    Returns (results written, that mapping file or None)."""
    done: dict[str, dict] = {}
    for text in out.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and line.get("ok"):
            done[str(line.get("id"))] = line
    numbered = not any("coco_image_id" in r for r in reqs)
    images: dict[str, dict] = {}
    results, not_rle = [], []
    for r in reqs:
        ref = str(r["image"] if "image" in r else r.get("image_id"))
        if numbered and ref not in images:
            images[ref] = {"id": len(images) + 1, "file_name": ref}
        line = done.get(str(r["id"]))
        if line is None:
            continue
        mask = line.get("mask")
        if not (isinstance(mask, dict) and isinstance(mask.get("counts"), str)):
            not_rle.append(str(r["id"]))
            continue
        h, w = (int(d) for d in mask["size"])
        if numbered:
            images[ref].update(sha256=line.get("image_id"), height=h, width=w)
        results.append({"image_id": images[ref]["id"] if numbered else r["coco_image_id"],
                        "category_id": r.get("category_id", 1),
                        "segmentation": {"size": [h, w], "counts": mask["counts"]},
                        "score": coco_score(line)})
    if not_rle:
        raise SystemExit(f"error: --coco: {len(not_rle)} results in {out} have no RLE mask "
                         f"(ids {not_rle[:5]}; from a run with another mask_format?): run them "
                         "again into a fresh --out")
    path.write_text(json.dumps(results))
    if not numbered:
        return len(results), None
    mapping = path.with_name(f"{path.stem}.images.json")
    mapping.write_text(json.dumps({"images": list(images.values())}, indent=1))
    return len(results), mapping


def summary(counts: dict, stats: dict, seconds: float, n: int) -> str:
    embed_misses = stats.get("embed_calls", 0) - stats.get("embed_cache_hits", 0)
    seg_misses = counts["ok"] - counts["hits"]
    misses = embed_misses + seg_misses
    done = counts["ok"] + counts["errors"]
    rate = done / seconds if seconds > 0 else 0.0
    hit_rate = (counts["ok"] - misses) / counts["ok"] if counts["ok"] else 0.0
    return (f"done: {done}/{n} items, {counts['ok']} ok, {counts['errors']} errors, "
            f"{seconds:.1f} s ({rate:.1f} items/s)\n"
            f"images: {stats.get('images', 0)} distinct; encoder misses {misses}, cache hits "
            f"{max(0, counts['ok'] - misses)} ({hit_rate:.0%} of ok items); text-mask cache hits "
            f"{stats.get('text_cache_hits', 0)}")


# --- eval -----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    """Offline scoring, no server: `python -m biprompt.evaluate` (the core, with torch) in a child
    process."""
    if not module_installed("biprompt.evaluate"):
        print("error: `biprompt eval` needs the full biprompt-serve install: make test / make "
              "demo build it (no module biprompt.evaluate here)", file=sys.stderr)
        return 2
    return run_foreground([sys.executable, "-m", "biprompt.evaluate", *args.eval_args],
                          env={**os.environ, "BIPROMPT_PROG": "biprompt eval"})


# --- offline --------------------------------------------------------------------------------


def cmd_offline(args) -> int:
    """The batch on Ray Data, no server: `python -m serving.offline` in a child process."""
    if not module_installed("serving.offline"):
        print("error: `biprompt offline` needs the full biprompt-serve install (Ray Data and the "
              "models): make test / make demo build it", file=sys.stderr)
        return 2
    return run_foreground([sys.executable, "-m", "serving.offline", *args.offline_args],
                          env={**os.environ, "BIPROMPT_PROG": "biprompt offline"})


# --- main -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biprompt", description=__doc__.split("\n")[0])
    p.add_argument("--url", default=os.environ.get("BIPROMPT_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("BIPROMPT_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--wire", choices=["msgpack", "json"], default="msgpack")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the local app in the foreground (Ray Serve)")
    s.add_argument("--config", default="configs/serve/local-cpu.yaml")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("segment", help="segment one object in one image")
    s.add_argument("image")
    s.add_argument("--point", action="append", type=lambda t: _pair(t, 2, "--point"),
                   metavar="X,Y", help="a click in image pixels; repeat for more")
    s.add_argument("--label", action="append", type=int, choices=[0, 1],
                   help="1 foreground (default) / 0 background, one per --point")
    s.add_argument("--box", type=lambda t: _pair(t, 4, "--box"), metavar="X0,Y0,X1,Y1")
    s.add_argument("--text", help="the referring expression")
    s.add_argument("--mode", choices=["biprompt", "point", "text", "reference"],
                   default="biprompt")
    s.add_argument("--reference", metavar="IMAGE", help="a reference image (file or image id) "
                   "with one object annotated: a third expert, 'things like this one'")
    s.add_argument("--reference-mask", metavar="PNG", help="the reference object's mask (white "
                   "on black, the reference image's size)")
    s.add_argument("--reference-point", action="append",
                   type=lambda t: _pair(t, 2, "--reference-point"), metavar="X,Y",
                   help="a point on the reference object (repeatable); SAM draws its mask")
    s.add_argument("--reference-box", type=lambda t: _pair(t, 4, "--reference-box"),
                   metavar="X0,Y0,X1,Y1", help="a box around the reference object")
    s.add_argument("--out", help="write the mask as a PNG (0/255)")
    s.add_argument("--overlay", help="write the mask, points and text over the image as a PNG")
    s.add_argument("--candidates", action="store_true", help="also fetch the three candidates")
    s.add_argument("--mask-input-id", metavar="ID", help="refine: the logits_id a previous call "
                   "printed; give every click so far (--point/--label) and IMAGE as that call's "
                   "image_id or file")
    s.add_argument("--json", action="store_true", help="print the full response as JSON")
    s.set_defaults(fn=cmd_segment)

    s = sub.add_parser("embed", help="precompute embeddings for a folder or glob of images")
    s.add_argument("images", help="a directory (recursive) or a glob such as 'data/*.jpg'")
    s.add_argument("--out", help="append {image, image_id, cache} lines to this JSONL file")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("batch", help="run a JSONL file of requests; resumable")
    s.add_argument("requests", help='JSONL: {"id", "image" or "image_id", "points", "text", ...}')
    s.add_argument("--out", required=True, help="results JSONL (ids already there are skipped)")
    s.add_argument("--coco", metavar="PATH",
                   help="then also write a COCO results file (COCO.loadRes) of every ok line in "
                        "--out: image_id from each line's \"coco_image_id\" (on every line or "
                        "none; else images are numbered 1, 2, ... by first appearance, listed "
                        "in PATH's <stem>.images.json), category_id from \"category_id\" "
                        "(default 1), score = SAM's predicted IoU of the selected candidate "
                        "(else the agreement, else 1). Needs RLE masks (the default mask_format)")
    s.add_argument("--concurrency", type=int, default=8)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_batch)

    s = sub.add_parser("offline", add_help=False,
                       help="run a JSONL file of requests on Ray Data, no server; resumable: "
                            "offline requests.jsonl --out results.jsonl [--config C] "
                            "[--profile P] [--format jsonl|parquet] [--address A]")
    s.add_argument("offline_args", nargs=argparse.REMAINDER,
                   help="passed to python -m serving.offline (try: offline --help)")
    s.set_defaults(fn=cmd_offline)

    s = sub.add_parser("eval", add_help=False,
                       help="score a local pipeline offline: eval shapes --n 500 --seed S "
                            "[--profile P] [--size WxH] [--json F]")
    s.add_argument("eval_args", nargs=argparse.REMAINDER,
                   help="passed to python -m biprompt.evaluate (try: eval --help)")
    s.set_defaults(fn=cmd_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        if args.command not in ("eval", "offline"):
            p.error(f"unrecognized arguments: {' '.join(extra)}")
        # `eval --help`: REMAINDER skips leading options
        rest = f"{args.command}_args"
        setattr(args, rest, extra + getattr(args, rest))
    try:
        return args.fn(args)
    except BiPromptClientError as exc:
        rid = f" (request {exc.request_id})" if getattr(exc, "request_id", None) else ""
        print(f"error: {exc}{rid}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
