"""Offline batch on Ray Data: a requests file in, one result line per item out, no HTTP.

    python -m serving.offline requests.jsonl --out results.jsonl [--config configs/offline/local-cpu.yaml]
        [--profile configs/models/demo.yaml] [--format jsonl|parquet] [--address auto]
    biprompt offline ...                                   # the same, from the client's CLI

    from serving.offline import run_offline
    report = run_offline("requests.jsonl", "results.jsonl", profile="configs/models/demo.yaml")

It reads what `biprompt batch` reads (one JSON object a line: "id", "image" as a path relative to
the file, "points", "labels", "box", "text", "mode", ...) and writes the lines it writes ("id",
"ok", "image_id", "mask" as COCO RLE, "selected", "predicted_iou", "strategy", "agreement", or
"error"), plus "image", "mode" and "candidates". The work runs as Ray Data stages, each an actor
pool of one role's engine (serving/offline_stages.py), sized and placed by the config:

    requests grouped by image (driver) -> EncoderStage (read, decode, check prompts, SAM encoder)
      -> PointStage (SAM decoder) -> TextStage (BEiT-3 + EVF decoder) -> SelectStage (the join)
      -> result lines, appended to the output by the driver as they stream in

Each distinct image path is encoded once. A failed item (unreadable image, invalid prompt, a
model error) gets an error line; the job goes on. Ids already in the output are skipped, so an
interrupted job is resumed by running it again. With no Ray running here it starts a local one;
with `--address` (or RAY_ADDRESS, as `ray job submit` sets) it runs on that cluster unchanged,
where every node must be able to read the image paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from biprompt import config as C
from deployments.settings import AppArgs
from serving.offline_io import FORMATS, group_by_image, infer_format, open_sink, read_items

DEFAULT_CONFIG = C.REPO / "configs/offline/local-cpu.yaml"


class StageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int | tuple[int, int] = Field(1, description="actor pool size, or [min, max] to "
                                          "autoscale")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractional shares one")
    batch_size: int = Field(4, ge=1, description="rows (images, or chunks of an image's items) "
                            "per call")
    torch_threads: int = Field(0, ge=0, description="0: every core of the node")


class OfflineConfig(BaseModel):
    """configs/offline/*.yaml. The model fields mean what they mean in a Serve config's app args
    (deployments/settings.py); the stages are Ray Data's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_profile: str = Field(C.DEFAULT_PROFILE, description="model profile YAML")
    embedding_dtype: str = Field("float16", description="embeddings between the stages, as "
                                 "served (float32: bit-exact with the in-process pipeline)")
    max_image_pixels: int = Field(C.DEFAULT_MAX_PIXELS, gt=0)
    agreement_threshold: float | None = Field(None, ge=0, le=1)
    fast_encoder: bool | None = None
    chunk_items: int = Field(64, ge=1, description="at most this many items of one image per "
                             "row after the encoder (one embedding, decoded in one call)")
    rows_per_block: int = Field(16, ge=1, description="images per input block")
    max_text_pairs: int = Field(16, ge=1, description="(image, text) pairs per text-model call")
    flush_rows: int = Field(1000, ge=1, description="parquet: rows per part file")
    encoder: StageOptions = StageOptions()
    points: StageOptions = StageOptions(num_cpus=0.5, batch_size=8)
    text: StageOptions = StageOptions(batch_size=4)
    select: StageOptions = StageOptions(num_cpus=0.25, batch_size=16, torch_threads=1)

    @classmethod
    def load(cls, source: OfflineConfig | dict | str | Path | None) -> OfflineConfig:
        if isinstance(source, cls):
            return source
        if source is None or isinstance(source, (str, Path)):
            data = yaml.safe_load(Path(source or DEFAULT_CONFIG).read_text()) or {}
            return cls.model_validate(data)
        return cls.model_validate(source)

    def app_args(self) -> AppArgs:
        """The served app's settings for the same model: each stage builds its engine from them."""
        return AppArgs(model_profile=self.model_profile, cache_url=None,
                       embedding_dtype=self.embedding_dtype,
                       max_image_pixels=self.max_image_pixels,
                       agreement_threshold=self.agreement_threshold,
                       fast_encoder=self.fast_encoder).resolved()


@dataclass
class OfflineReport:
    out: str
    format: str
    requests: int = 0
    skipped: int = 0  # already in the output
    ran: int = 0
    ok: int = 0
    errors: int = 0
    images: int = 0  # distinct image paths among the items run
    seconds: float = 0.0
    first_result_s: float | None = None  # job start to the first line written
    ready_s: dict[str, float] = field(default_factory=dict)  # job start to each stage's pool up
    counts: dict[str, int] = field(default_factory=dict)  # the stages' own (Tally)

    @property
    def encoder_images(self) -> int:
        return self.counts.get("encoder_images", 0)

    @property
    def throughput(self) -> float:
        return self.ran / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        c = self.counts
        return (f"offline: {self.ran} items run ({self.skipped} already in {self.out}), "
                f"{self.ok} ok, {self.errors} errors, {self.seconds:.1f} s "
                f"({self.throughput:.1f} items/s)\n"
                f"images: {self.images} distinct; encoder passes {self.encoder_images}, decoder "
                f"prompts {c.get('decoder_prompts', 0)}, text-model pairs {c.get('text_pairs', 0)}")


# --- the job --------------------------------------------------------------------------------


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Ray for the job: the one this process is connected to; else the cluster at `address` or
    RAY_ADDRESS; else a local Ray of its own. Returns whether it started one (to shut down)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, logging_level="WARNING")
    return True


def _pool(opts: StageOptions):
    from ray.data import ActorPoolStrategy

    if isinstance(opts.actors, int):
        return ActorPoolStrategy(size=opts.actors)
    return ActorPoolStrategy(min_size=opts.actors[0], max_size=opts.actors[1])


def build_dataset(rows: list[dict], cfg: OfflineConfig, tally, text_model: bool):
    """The stages, as one Ray Data pipeline: it runs (streaming) when iterated."""
    import ray

    from serving.offline_stages import EncoderStage, PointStage, SelectStage, TextStage

    args = cfg.app_args()
    blocks = max(1, math.ceil(len(rows) / cfg.rows_per_block))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)

    def stage(ds, cls, opts: StageOptions, **kwargs):
        return ds.map_batches(cls, batch_size=opts.batch_size, batch_format="numpy",
                              compute=_pool(opts), num_cpus=opts.num_cpus,
                              num_gpus=opts.num_gpus or None,
                              fn_constructor_kwargs={"args": args, "tally": tally,
                                                     "torch_threads": opts.torch_threads,
                                                     **kwargs})

    ds = stage(ds, EncoderStage, cfg.encoder, chunk=cfg.chunk_items)
    ds = stage(ds, PointStage, cfg.points, keep_embedding=text_model)
    if text_model:
        ds = stage(ds, TextStage, cfg.text, max_pairs=cfg.max_text_pairs)
    return stage(ds, SelectStage, cfg.select)


def run_offline(requests_path: str | Path, out_path: str | Path, *,
                config: OfflineConfig | dict | str | Path | None = None,
                profile: str | Path | None = None, fmt: str | None = None,
                address: str | None = None, num_cpus: int | None = None,
                progress: bool = False) -> OfflineReport:
    """Run every request of `requests_path` not yet in `out_path` through the Ray Data stages;
    append their lines (jsonl) or part files (parquet: `out_path` is a directory). `profile`
    overrides the config's model_profile. Raises ValueError for a malformed requests file."""
    import ray
    from ray.data import DataContext

    from biprompt.profile import ModelProfile
    from serving.offline_items import error_line, no_image_error
    from serving.offline_stages import Tally

    t0, wall0 = time.perf_counter(), time.time()
    cfg = OfflineConfig.load(config)
    if profile is not None:
        cfg = cfg.model_copy(update={"model_profile": str(profile)})
    out = Path(out_path)
    fmt = infer_format(out, fmt)
    reqs = read_items(Path(requests_path))
    sink = open_sink(out, fmt, cfg.flush_rows)
    report = OfflineReport(out=str(out), format=fmt, requests=len(reqs))
    try:
        todo = [r for r in reqs if str(r["id"]) not in sink.done]
        report.skipped, report.ran = len(reqs) - len(todo), len(todo)
        rows, orphans = group_by_image(todo)
        report.images = len(rows)
        sink.write([json.dumps(error_line(str(item["id"]), None, no_image_error(item)))
                    for item in orphans])
        report.errors += len(orphans)
        if rows:
            started = connect(address, num_cpus)
            ctx = DataContext.get_current()
            ctx.enable_progress_bars = progress
            ctx.print_on_execution_start = progress
            tally = Tally.remote()
            try:
                text_model = ModelProfile.load(cfg.app_args().model_profile).text is not None
                ds = build_dataset(rows, cfg, tally, text_model)
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if report.first_result_s is None:
                        report.first_result_s = time.perf_counter() - t0
                    sink.write([str(x) for x in batch["line"]])
                    ok = int(sum(bool(x) for x in batch["ok"]))
                    report.ok += ok
                    report.errors += len(batch["ok"]) - ok
                report.counts = ray.get(tally.get.remote())
                report.ready_s = {role: at - wall0
                                  for role, at in ray.get(tally.ready_times.remote()).items()}
            finally:
                ray.kill(tally)
                if started:
                    ray.shutdown()
    finally:
        sink.close()
    report.seconds = time.perf_counter() - t0
    return report


# --- CLI ------------------------------------------------------------------------------------


def parser(prog: str = "python -m serving.offline") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    ap.add_argument("requests", help='JSONL: {"id", "image" (a path), "points", "text", ...}, '
                    "as for `biprompt batch`")
    ap.add_argument("--out", required=True, help="results: a .jsonl file (appended), or a "
                    "directory / .parquet path for parquet parts; ids already there are skipped")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG),
                    help="stages and model (configs/offline/*.yaml; default: %(default)s)")
    ap.add_argument("--profile", help="model profile, overriding the config's model_profile")
    ap.add_argument("--format", choices=FORMATS, help="default: from --out (.parquet or a "
                    "directory: parquet; else jsonl)")
    ap.add_argument("--address", help="a Ray cluster (e.g. auto); default: RAY_ADDRESS, else a "
                    "local Ray of its own")
    ap.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--coco", metavar="PATH", help="then write a COCO results file of every ok "
                    "line (jsonl only), as `biprompt batch --coco` does")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv=None) -> int:
    args = parser(os.environ.get("BIPROMPT_PROG", "python -m serving.offline")).parse_args(argv)
    if args.coco and infer_format(Path(args.out), args.format) != "jsonl":
        print("error: --coco needs jsonl output", file=sys.stderr)
        return 2
    try:
        if args.coco:
            from biprompt_client.cli import check_coco_requests

            check_coco_requests(read_items(Path(args.requests)))
        report = run_offline(args.requests, args.out, config=args.config, profile=args.profile,
                             fmt=args.format, address=args.address, num_cpus=args.num_cpus,
                             progress=not args.no_progress)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stderr)
    if args.coco:
        from biprompt_client.cli import write_coco

        n, mapping = write_coco(read_items(Path(args.requests)), Path(args.out), Path(args.coco))
        print(f"coco: wrote {n} results to {args.coco}"
              + (f"; image ids in {mapping}" if mapping else ""), file=sys.stderr)
    if args.json:
        print(json.dumps({**asdict(report), "throughput": report.throughput}))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
