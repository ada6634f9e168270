"""Where weights come from: a local path, a Hugging Face hub id (standard cache, honours
HF_HUB_OFFLINE), or an official SAM download URL verified by sha256.

Nothing downloads unless a source that needs it is named; without network the error names the
file and how to supply it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from biprompt.errors import WeightsUnavailableError


@dataclass(frozen=True)
class OfficialSam:
    variant: str
    url: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_SAM: dict[str, OfficialSam] = {
    "vit_h": OfficialSam("vit_h", _SAM_BASE + "sam_vit_h_4b8939.pth", 2564550879,
                         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": OfficialSam("vit_l", _SAM_BASE + "sam_vit_l_0b3195.pth", 1249524607,
                         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": OfficialSam("vit_b", _SAM_BASE + "sam_vit_b_01ec64.pth", 375042383,
                         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}
EVF_FILES = [
    "config.json", "*.safetensors", "*.bin", "*.index.json", "sentencepiece.bpe.model",
    "tokenizer_config.json", "special_tokens_map.json",
]
_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """Official SAM files live beside the Hugging Face cache (BIPROMPT_CACHE overrides)."""
    if "BIPROMPT_CACHE" in os.environ:
        return Path(os.environ["BIPROMPT_CACHE"])
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "biprompt"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def official_sam(source: str) -> OfficialSam | None:
    """`vit_h` / `sam_vit_h` / the file name / the URL -> the official entry, else None."""
    for entry in OFFICIAL_SAM.values():
        if source in (entry.variant, "sam_" + entry.variant, entry.filename, entry.url):
            return entry
    return None


def fetch_official_sam(entry: OfficialSam, directory: Path | None = None) -> Path:
    """The official checkpoint, from the cache or downloaded, verified by size and sha256.

    Replicas starting together on one node (encoder, decoder, text model) may all ask for it at
    once: a file lock beside the target makes one of them download while the others wait, then
    find it cached. Each download goes to a temporary file of its own, renamed into place only
    once verified, so no reader ever sees a partial checkpoint."""
    directory = directory or cache_dir()
    target = directory / entry.filename
    if target.is_file():
        return target
    how = (f"download {entry.url} (sha256 {entry.sha256}) and pass its path, "
           f"or place it at {target}")
    if _offline():
        raise WeightsUnavailableError(f"{entry.filename} is not cached and HF_HUB_OFFLINE is set: {how}")
    from filelock import FileLock

    directory.mkdir(parents=True, exist_ok=True)
    locks = directory / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / (entry.filename + ".lock"))):
        if target.is_file():  # another process finished it while this one waited
            return target
        _download(entry, target, how)
    return target


def _download(entry: OfficialSam, target: Path, how: str) -> None:
    import tempfile
    import urllib.request

    fd, name = tempfile.mkstemp(prefix=entry.filename + ".", suffix=".partial", dir=target.parent)
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry.url, timeout=20) as resp:
            while block := resp.read(1 << 22):
                out.write(block)
        digest = sha256_file(partial)
        if partial.stat().st_size != entry.size or digest != entry.sha256:
            raise WeightsUnavailableError(f"{entry.filename} failed verification (sha256 "
                                          f"{digest}, expected {entry.sha256}): {how}")
        os.replace(partial, target)
    except OSError as exc:
        raise WeightsUnavailableError(f"could not download {entry.filename} ({exc}): {how}") from None
    finally:
        partial.unlink(missing_ok=True)


def resolve_file(source: str | os.PathLike, filename: str | None = None) -> Path:
    """A SAM `.pth`: a local path, an official name/URL, or `owner/repo` + filename on the hub."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    text = str(source)
    entry = official_sam(text)
    if entry is not None:
        return fetch_official_sam(entry)
    if _HUB_ID.match(text) and filename:
        return Path(_hub(text, filename=filename))
    raise WeightsUnavailableError(
        f"checkpoint {text!r} is neither a file nor an official SAM name "
        f"({', '.join(sorted(OFFICIAL_SAM))}) nor a hub id with a filename"
    )


def resolve_dir(source: str | os.PathLike, files: list[str] | None = None) -> Path:
    """An EVF-SAM checkpoint directory: a local path or a hub id (e.g. `YxZhang/evf-sam`).
    `files`: fetch only these patterns from the hub (e.g. config.json for a role that needs no
    weights); default: every file EVF-SAM needs."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if _HUB_ID.match(text):
        return Path(_hub(text, patterns=files))
    raise WeightsUnavailableError(f"{text!r} is neither a local directory nor a hub id (owner/name)")


def _hub(repo: str, filename: str | None = None, patterns: list[str] | None = None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = repo.removeprefix("hf://")
    how = (f"fetch it where there is network (`hf download {repo}`) into the Hugging Face cache "
           "and set HF_HUB_OFFLINE=1, or pass a local path")
    try:
        if filename:
            return hf_hub_download(repo, filename)
        return snapshot_download(repo, allow_patterns=patterns or EVF_FILES)
    except Exception as exc:  # offline, no network, unknown repo, gated...
        what = f"{repo}/{filename}" if filename else repo
        raise WeightsUnavailableError(f"{what} is not available ({type(exc).__name__}): {how}") from None
