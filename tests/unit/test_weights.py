"""Weight sources: local paths, official SAM files verified by sha256, hub ids; offline fails fast."""

from __future__ import annotations

import hashlib
import socket

import pytest

from biprompt import weights
from biprompt.errors import WeightsUnavailableError
from biprompt.weights import (
    OfficialSam,
    fetch_official_sam,
    official_sam,
    resolve_dir,
    resolve_file,
)


def test_official_names_resolve():
    for name in ("vit_b", "sam_vit_b", "sam_vit_b_01ec64.pth", weights.OFFICIAL_SAM["vit_b"].url):
        assert official_sam(name).variant == "vit_b"
    assert official_sam("something_else") is None


def test_offline_fails_fast_and_names_the_file(monkeypatch):
    """Fast = without touching the network (nothing to wait for), not within a wall-clock bound:
    every name lookup and connection is recorded, and refused as on an offline machine."""
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError("the network is unreachable (test)")

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("no name resolution (test)")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"sam_vit_h_4b8939\.pth.*pass its path"):
        resolve_file("vit_h")
    with pytest.raises(WeightsUnavailableError, match="YxZhang/evf-sam.*local path"):
        resolve_dir("YxZhang/evf-sam")
    assert attempts == []


def test_local_paths_win(tmp_path):
    f = tmp_path / "my.pth"
    f.write_bytes(b"x")
    assert resolve_file(f) == f
    assert resolve_dir(tmp_path) == tmp_path
    with pytest.raises(WeightsUnavailableError, match="neither a file"):
        resolve_file(tmp_path / "nope.pth")


def test_download_is_verified_by_sha256(tmp_path, monkeypatch):
    """The real download path, against a file:// URL (no network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    src = tmp_path / "src" / "sam_fake_123456.pth"
    src.parent.mkdir()
    payload = b"pretend checkpoint bytes" * 100
    src.write_bytes(payload)
    good = OfficialSam("fake", src.as_uri(), len(payload), hashlib.sha256(payload).hexdigest())
    got = fetch_official_sam(good, tmp_path / "cache")
    assert got.read_bytes() == payload
    assert fetch_official_sam(good, tmp_path / "cache") == got  # cached: no second download
    bad = OfficialSam("fake", src.as_uri(), len(payload), "0" * 64)
    with pytest.raises(WeightsUnavailableError, match="failed verification"):
        fetch_official_sam(bad, tmp_path / "other")
    # nothing half-written left behind (the lock files stay, as Hugging Face's do)
    assert [p.name for p in (tmp_path / "other").iterdir()] == [".locks"]


def test_replicas_starting_together_download_once(tmp_path, monkeypatch):
    """Encoder, decoder and text replicas on one node all ask for the checkpoint at once: one
    downloads, the others wait on the lock and find it cached."""
    import threading
    import urllib.request

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    src = tmp_path / "sam_fake_654321.pth"
    payload = bytes(range(256)) * 4096  # 1 MiB
    src.write_bytes(payload)
    entry = OfficialSam("fake", src.as_uri(), len(payload), hashlib.sha256(payload).hexdigest())
    opened, real = [], urllib.request.urlopen

    def counting(url, *a, **kw):
        opened.append(url)
        return real(url, *a, **kw)

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    start, got, errors = threading.Barrier(4), [], []

    def fetch():
        start.wait()
        try:
            got.append(fetch_official_sam(entry, tmp_path / "cache"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(got) == 4 and len(set(got)) == 1
    assert got[0].read_bytes() == payload and len(opened) == 1
    assert not list((tmp_path / "cache").glob("*.partial"))
