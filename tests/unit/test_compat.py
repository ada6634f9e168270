"""The torchvision/timm stand-ins behave like the originals for the calls our packages make."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from biprompt import _compat


def test_resize_is_pil_bilinear():
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    got = np.asarray(_compat.resize(pil, [20, 29]))
    want = np.asarray(pil.resize((29, 20), Image.BILINEAR))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(_compat.to_pil_image(img)), img)


def test_batched_nms_keeps_best_per_category():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60.]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.tensor([0, 0, 1, 0])
    keep = _compat.batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == [0, 2, 3]


def test_drop_path_is_identity_at_inference():
    x = torch.randn(4, 3)
    assert torch.equal(_compat.drop_path(x, 0.5, training=False), x)
    y = _compat.drop_path(torch.ones(1000, 1), 0.5, training=True)
    assert set(y.unique().tolist()) <= {0.0, 2.0}


def test_core_package_never_imports_ray():
    code = ("import sys, biprompt, biprompt.pipeline, biprompt.factory; "
            "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
