"""The offline batch's input and output (serving/offline.py): the requests file read as
`biprompt batch` reads it, grouped by image; results appended to a JSONL file or written as
parquet parts; the ids already there, for resuming."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

FORMATS = ("jsonl", "parquet")
_NOT_SENT = ("image", "coco_image_id", "category_id")  # the image goes in the row; COCO keys


# --- input ----------------------------------------------------------------------------------


def read_items(path: Path) -> list[dict]:
    """The requests, checked as `biprompt batch` checks them (the client CLI's own reader: JSON
    lines, an "id" on each, no duplicates, no unknown keys, image paths relative to the file).
    Raises ValueError for a malformed file."""
    from biprompt_client.cli import read_requests

    try:
        return read_requests(Path(path))
    except SystemExit as exc:  # the CLI's way of reporting a bad file
        raise ValueError(str(exc).removeprefix("error: ")) from None


def group_by_image(reqs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(one row per distinct image path, {"image": absolute path, "items": JSON list}; the items
    that name no image file, which get their error line at once)."""
    groups: dict[str, list[dict]] = {}
    orphans = []
    for r in reqs:
        item = {k: v for k, v in r.items() if k not in _NOT_SENT}
        if "image" not in r:
            orphans.append(item)
            continue
        groups.setdefault(str(Path(r["image"]).resolve()), []).append(item)
    return [{"image": k, "items": json.dumps(v)} for k, v in groups.items()], orphans


# --- output ---------------------------------------------------------------------------------


def infer_format(out: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    return "parquet" if out.suffix == ".parquet" or out.is_dir() else "jsonl"


def result_schema():
    """The parquet columns: the JSONL line's keys, masks as {size, counts} structs."""
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    candidate = pa.struct([("index", pa.int32()), ("predicted_iou", pa.float64()),
                           ("text_iou", pa.float64()), ("mask", rle)])
    error = pa.struct([("type", pa.string()), ("message", pa.string()),
                       ("status_code", pa.int32()), ("request_id", pa.string())])
    return pa.schema([
        ("id", pa.string()), ("ok", pa.bool_()), ("image", pa.string()),
        ("image_id", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("mode", pa.string()), ("mask", rle), ("selected", pa.int32()),
        ("predicted_iou", pa.float64()), ("strategy", pa.string()),
        ("agreement", pa.float64()), ("candidates", pa.list_(candidate)),
        ("text_mask", rle), ("error", error),
    ])


class JsonlOut:
    """Lines appended to one file and flushed as they come, as `biprompt batch` writes them."""

    def __init__(self, path: Path):
        from biprompt_client.cli import done_ids

        path.parent.mkdir(parents=True, exist_ok=True)
        self.done = done_ids(path)  # and drops a last line an interruption cut short
        self.fh = open(path, "a")  # noqa: SIM115 - closed by close()

    def write(self, lines: list[str]) -> None:
        self.fh.write("".join(f"{line}\n" for line in lines))
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class ParquetOut:
    """A directory of part files, each written whole and then renamed into place: a part is
    complete or absent, and rows not yet in a part when the job stops run again on resume."""

    def __init__(self, path: Path, flush_rows: int = 1000):
        import pyarrow.parquet as pq

        path.mkdir(parents=True, exist_ok=True)
        for tmp in path.glob(".tmp-*"):
            tmp.unlink()
        self.path, self.flush_rows, self.rows = path, flush_rows, []
        self.run, self.parts = uuid.uuid4().hex[:8], 0
        self.done = {str(i) for part in sorted(path.glob("*.parquet"))
                     for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()}

    def write(self, lines: list[str]) -> None:
        self.rows += [json.loads(line) for line in lines]
        if len(self.rows) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=result_schema())
        name = f"part-{self.run}-{self.parts:05d}.parquet"
        tmp = self.path / f".tmp-{name}"
        pq.write_table(table, tmp)
        tmp.rename(self.path / name)
        self.parts, self.rows = self.parts + 1, []

    def close(self) -> None:
        self._flush()


def open_sink(out: Path, fmt: str, flush_rows: int) -> JsonlOut | ParquetOut:
    return JsonlOut(out) if fmt == "jsonl" else ParquetOut(out, flush_rows)
