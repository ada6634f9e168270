"""Reading checkpoints key by key (biprompt.models.checkpoint.LazyState): the safetensors reader
agrees with the safetensors library, and each role's engine reads only its own keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from biprompt.errors import CheckpointError
from biprompt.factory import SAM_PARTS, load_sam_part, open_sam
from biprompt.models.checkpoint import LazyState, open_state
from biprompt.models.sam import build_sam, get_sam_spec


def test_safetensors_reader_matches_the_library(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "i64": torch.arange(6).view(2, 3),
               "empty": torch.zeros(0, 4), "bf16": torch.randn(2, 2).bfloat16(),
               "bool": torch.tensor([True, False, True])}
    save_file(tensors, str(path), metadata={"format": "pt"})
    state, ref = open_state(path), load_file(str(path))
    assert state.shapes == {k: tuple(v.shape) for k, v in ref.items()}
    for key, want in ref.items():
        got = state[key]
        assert got.dtype == want.dtype and torch.equal(got, want), key


def test_safetensors_truncated_file_fails_only_the_tensors_it_lost(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4), "z": torch.ones(1000)}, str(path))  # data sorted by name
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    state = open_state(path)
    assert torch.equal(state["a"], torch.ones(4))
    with pytest.raises(CheckpointError, match="truncated"):
        state["z"]


def test_lazy_views_read_only_what_is_asked():
    reads: list[str] = []
    base = {"x.a": torch.ones(1), "x.b": torch.ones(2), "y.c": torch.ones(3)}
    state = LazyState({k: tuple(v.shape) for k, v in base.items()},
                      lambda k: reads.append(k) or base[k])
    sub = state.sub("x.")
    assert sub.shapes == {"a": (1,), "b": (2,)} and reads == []
    assert state.without("x.").shapes == {"y.c": (3,)} and reads == []
    assert set(sub.select("")) == {"a", "b"} and sorted(reads) == ["x.a", "x.b"]
    assert set(LazyState.union([state.sub("x."), state.sub("y.")]).shapes) == {"a", "b", "c"}


@pytest.mark.parametrize("part", SAM_PARTS)
def test_each_sam_part_reads_only_its_own_keys(tmp_path, part):
    spec = get_sam_spec("tiny")
    torch.manual_seed(0)
    model = build_sam(spec)
    torch.save(model.state_dict(), tmp_path / "sam.pth")
    src = open_sam(tmp_path / "sam.pth")
    reads: list[str] = []
    fetch = src.state._fetch
    src.state._fetch = lambda k: reads.append(k) or fetch(k)
    module = load_sam_part(src, part)
    assert reads and all(k.startswith(part + ".") for k in reads)
    assert len(reads) == len(module.state_dict())
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[f"{part}.{key}"], rtol=0, atol=0)


def test_a_part_in_another_dtype_is_converted_while_read(tmp_path):
    torch.manual_seed(0)
    model = build_sam(get_sam_spec("tiny")).half()
    torch.save(model.state_dict(), tmp_path / "sam16.pth")
    decoder = load_sam_part(open_sam(tmp_path / "sam16.pth"), "mask_decoder", torch.float32)
    w = decoder.iou_token.weight
    assert w.dtype == torch.float32 and torch.equal(w, model.mask_decoder.iou_token.weight.float())


def test_a_checkpoint_with_foreign_top_level_keys_is_refused(tmp_path):
    state = build_sam(get_sam_spec("tiny")).state_dict()
    state["extra.weight"] = torch.ones(1)
    torch.save(state, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_sam_part(open_sam(tmp_path / "sam.pth", "tiny"), "mask_decoder")
