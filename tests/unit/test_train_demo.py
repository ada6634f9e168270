"""The demo-model trainer: batches that follow the spec's sampling, and a few real training steps
whose checkpoints load through the same code as official ones. CI never retrains the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from biprompt.data.shapes_ref import resolve
from biprompt.models.sam import SAM_VARIANTS, build_sam
from biprompt.pipeline import BiPromptPipeline
from biprompt.train import batches, demo


def test_point_batches_target_an_object_under_the_point(monkeypatch):
    drawn = []
    real = batches.generate_scene

    def spy(rng, h, w, **kw):
        drawn.append(real(rng, h, w, **kw))
        return drawn[-1]

    monkeypatch.setattr(batches, "generate_scene", spy)
    b = batches.make_batch(np.random.default_rng(0), 6, 5, 256, 128)
    assert b.images.shape == (6, 3, 256, 256) and b.gt.shape == (30, 1, 256, 256)
    assert b.beit.shape == (6, 3, 128, 128)
    for i in range(30):
        x, y = (int(v) for v in b.coords[i, 0])  # model frame, SAM's +0.5 not yet added
        if drawn[i // 5].size == (256, 256):  # not resized: exact
            assert b.gt[i, 0, y, x] == 1.0, "the point lies on its target"
        else:  # resized with the image: on the target up to a pixel of resampling
            assert b.gt[i, 0, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max() == 1.0
    assert {d.size for d in drawn} <= {(256, 256), (240, 320), (320, 240), (224, 288)}


def test_text_batches_target_the_object_the_expression_names(monkeypatch):
    drawn = []
    real = batches.generate_scene
    monkeypatch.setattr(batches, "generate_scene",
                        lambda rng, h, w, **kw: drawn.append(real(rng, h, w, **kw)) or drawn[-1])
    b = batches.make_batch(np.random.default_rng(1), 4, 3, 256, 128, text_targets=True)
    for i, text in enumerate(b.texts):
        scene = drawn[i // 3]
        (target,) = resolve(scene, text)
        gt = b.gt[i, 0].numpy() > 0.5
        h, w = scene.size
        if (h, w) == (256, 256):
            assert np.array_equal(gt, scene.objects[target].mask)


def test_wide_batches_draw_other_canvases_and_keep_points_on_their_targets(monkeypatch):
    """make train-demo's scenes (shapes_ref.WIDE): the listed canvases and free ones; the loss
    target still lies under its point, in the padded model frame."""
    drawn = []
    real = batches.generate_scene

    def spy(rng, h, w, **kw):
        assert kw["variation"] is batches.WIDE
        drawn.append(real(rng, h, w, **kw))
        return drawn[-1]

    monkeypatch.setattr(batches, "generate_scene", spy)
    rng = np.random.default_rng(3)
    for _ in range(4):
        b = batches.make_batch(rng, 8, 2, 256, 128, variation=batches.WIDE)
        for i in range(16):
            x, y = (int(v) for v in b.coords[i, 0])
            assert b.gt[i, 0, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].max() == 1.0
    listed = {c for c, _ in batches.CANVASES}
    free = [d.size for d in drawn if d.size not in listed]
    lo, hi = batches.FREE_SIDES
    assert free and all(lo <= h <= hi and lo <= w <= hi for h, w in free)


def test_canvas_weights_reweight_the_listed_canvases_and_refuse_a_bad_list(monkeypatch):
    """refine.py --canvas-weights: only the weighted canvases are drawn, in their proportions;
    the default list draws exactly the stream it drew before; a bad list is a clear error."""
    only_wide = batches.reweighted_canvases("0,1,0,0")
    assert [size for size, _ in only_wide] == [size for size, _ in batches.CANVASES]
    rng = np.random.default_rng(0)
    assert {batches.draw_canvas(rng, None, only_wide) for _ in range(50)} == {(240, 320)}
    half = batches.reweighted_canvases("1,1,0,0")
    drawn = [batches.draw_canvas(rng, None, half) for _ in range(2000)]
    assert set(drawn) == {(256, 256), (240, 320)}
    assert 0.45 < drawn.count((240, 320)) / len(drawn) < 0.55
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert ([batches.draw_canvas(a, None) for _ in range(200)]
            == [batches.draw_canvas(b, None, batches.CANVASES) for _ in range(200)])
    for bad in ("1,2", "1,-1,0,0", "0,0,0,0", "a,b,c,d"):
        with pytest.raises(ValueError, match="canvas"):
            batches.reweighted_canvases(bad)
    sizes = []
    real = batches.generate_scene

    def spy(rng, h, w, **kw):
        sizes.append((h, w))
        return real(rng, h, w, **kw)

    monkeypatch.setattr(batches, "generate_scene", spy)
    batches.make_batch(np.random.default_rng(1), 6, 1, 256, 128, canvases=only_wide)
    assert sizes == [(240, 320)] * 6


def test_min_over_candidates_loss_prefers_the_matching_candidate():
    gt = torch.zeros(1, 1, 64, 64)
    gt[..., 8:32, 8:32] = 1
    good = torch.full((1, 1, 16, 16), -8.0)
    good[..., 2:8, 2:8] = 8.0  # the same square, at low resolution
    bad = torch.full((1, 1, 16, 16), -8.0)
    logits = torch.cat([bad, good, -bad], dim=1)
    per, iou = demo.mask_losses(logits, gt, 64)
    assert per.argmin().item() == 1 and iou[0, 1] > 0.9 and iou[0, 0] == 0


def test_lr_schedule_warms_up_then_decays():
    lrs = [demo.lr_at(s, 1000, 1e-3, 100) for s in range(1000)]
    assert lrs[0] < lrs[50] < lrs[99] == pytest.approx(1e-3)
    assert lrs[999] < 0.05 * 1e-3 and all(a >= b for a, b in zip(lrs[100:], lrs[101:],
                                                                   strict=False))


def test_a_few_steps_write_official_layout_checkpoints(tmp_path):
    out = tmp_path / "demo"
    summary = demo.main(["--out", str(out), "--sam-steps", "2", "--evf-steps", "2",
                         "--images", "2", "--evf-images", "2", "--prompts", "2", "--log-every", "1",
                         "--quiet"])
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sam", "sam", "evf", "evf"]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # SAM: a plain state dict with exactly the keys segment-anything's own model has
    state = torch.load(out / "sam_demo.pth", weights_only=True)
    assert set(state) == set(build_sam(SAM_VARIANTS["demo"]).state_dict())
    assert {f.name for f in (out / "evf_demo").iterdir()} >= {
        "config.json", "model.safetensors", "sentencepiece.bpe.model"}
    assert summary["sam_bytes"] + summary["evf_bytes"] < 10 * 2**20
    profile = tmp_path / "p.yaml"
    profile.write_text(f"sam: {{checkpoint: {out / 'sam_demo.pth'}, variant: demo}}\n"
                       f"text_model: {{checkpoint: {out / 'evf_demo'}}}\n")
    pipe = BiPromptPipeline.from_config(profile)
    img = np.full((240, 320, 3), 120, dtype=np.uint8)
    res = pipe.segment(img, [[100, 100]], text="the small red circle")
    assert res.mask.shape == (240, 320) and res.candidates.shape == (3, 240, 320)


def test_reference_stage_trains_on_the_frozen_sam_and_writes_its_layout(tmp_path):
    """A few steps of biprompt.train.reference on the bundled SAM: episodes pair objects of one
    class across scenes, SAM is untouched, and vrp_demo/ loads as the profile's reference model."""
    import shutil

    from biprompt.models.vrp import load_vrp
    from biprompt.train import reference

    shutil.copy("models/demo/sam_demo.pth", tmp_path / "sam_demo.pth")
    before = (tmp_path / "sam_demo.pth").read_bytes()
    summary = reference.main(["--model", str(tmp_path), "--pool", "24", "--held-out", "8",
                              "--held-out-episodes", "64", "--steps", "3", "--batch", "4",
                              "--log-every", "1", "--quiet", "--threads", "1"])
    assert (tmp_path / "sam_demo.pth").read_bytes() == before
    assert 0.0 <= summary["held_out_iou"] <= 1.0
    vrp = load_vrp(tmp_path / "vrp_demo")
    assert vrp.config.own_decoder and vrp.mask_decoder is not None
    rows = [json.loads(line) for line in (tmp_path / "reference_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the pool's episodes: the reference object has the target's class, in another scene
    from biprompt.factory import load_sam

    sam = load_sam(tmp_path / "sam_demo.pth", "demo").model.float().eval()
    pool = reference.Pool(sam, 12, np.random.default_rng(0), quiet=True)
    for key, members in pool.by_class.items():
        assert all(pool.objects[i][1] == key for i in members)
    tgt, ref, ref_mask, gt = pool.episodes(np.random.default_rng(1), 5)
    assert tgt.shape == ref.shape and ref_mask.shape[1:] == (1, 16, 16)
    assert gt.shape[1:] == (1, 128, 128) and float(gt.max()) <= 1.0
    profile = {"name": "t", "sam": {"checkpoint": str(tmp_path / "sam_demo.pth"),
                                    "variant": "demo"},
               "reference_model": {"checkpoint": str(tmp_path / "vrp_demo")}}
    pipe = BiPromptPipeline.from_profile(profile)
    img = np.full((256, 256, 3), 120, np.uint8)
    mask = np.zeros((256, 256), bool)
    mask[50:100, 50:100] = True
    res = pipe.segment(img, [[70, 70]], reference=pipe.encode_reference(img, mask=mask))
    assert "reference" in res.expert_masks


def test_text_stage_retrains_only_the_text_expert_in_place(tmp_path):
    """biprompt.train.text on a copy of the bundled model: a few steps change EVF-SAM's decoding
    weights and nothing else (its image encoder is the SAM's, the SAM file is untouched), and the
    checkpoint it writes back loads through the profile as before. A foreign SAM is refused."""
    import shutil

    from biprompt.models.evf_loading import read_hf_weights
    from biprompt.train import text

    shutil.copytree("models/demo", tmp_path, dirs_exist_ok=True)
    before_sam = (tmp_path / "sam_demo.pth").read_bytes()
    shipped = json.loads((tmp_path / "text_summary.json").read_text())
    shipped_passes = len(shipped)
    # make train-demo trains it in one run from nothing, with the grounding loss
    assert shipped_passes == 1 and shipped[0]["args"]["new"] and shipped[0]["args"]["grounding"] == 1
    before = read_hf_weights(tmp_path / "evf_demo")
    summary = text.main(["--model", str(tmp_path), "--steps", "3", "--images", "2",
                         "--prompts", "2", "--warmup", "1", "--log-every", "1", "--quiet",
                         "--threads", "1", "--pool", "3"])
    assert (tmp_path / "sam_demo.pth").read_bytes() == before_sam
    after = read_hf_weights(tmp_path / "evf_demo")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith(text.ENCODER) for k in changed)
    assert any(k.startswith("mm_extractor.") for k in changed)
    assert summary["evf_bytes"] < 7 * 2**20
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    # appended to the bundled model's log (which holds the shipped stages' rows)
    assert [(r["stage"], r["step"]) for r in rows[-3:]] == [("text", 1), ("text", 2), ("text", 3)]
    # one entry appended to the shipped run's (text_summary.json is a list, one per pass)
    assert len(json.loads((tmp_path / "text_summary.json").read_text())) == shipped_passes + 1
    profile = {"name": "t", "sam": {"checkpoint": str(tmp_path / "sam_demo.pth"), "variant": "demo"},
               "text_model": {"checkpoint": str(tmp_path / "evf_demo")}}
    pipe = BiPromptPipeline.from_profile(profile)
    res = pipe.segment(np.full((240, 320, 3), 120, np.uint8), [[100, 100]],
                       text="the small red circle")
    assert "text" in res.expert_masks

    other = build_sam(SAM_VARIANTS["demo"]).state_dict()
    torch.save({k: v.half() for k, v in other.items()}, tmp_path / "sam_demo.pth")
    with pytest.raises(SystemExit, match="not trained on this SAM"):
        text.main(["--model", str(tmp_path), "--steps", "1", "--pool", "1", "--quiet"])


def test_one_hour_recipe_trains_sam_alone_then_a_new_text_expert_on_it(tmp_path):
    """make train-demo FAST=1's text path: `demo --evf-steps 0` writes only the SAM; `text --new`
    then builds a text expert on that SAM (its image encoder a copy of the saved one), trains it
    from its seed and writes the whole layout, tokenizer included; the same seed gives the same
    weights (same code path), and the summary holds this run alone."""
    from biprompt.models.evf_loading import read_hf_weights
    from biprompt.train import text

    out = tmp_path / "demo"
    summary = demo.main(["--out", str(out), "--sam-steps", "1", "--evf-steps", "0",
                         "--images", "2", "--prompts", "2", "--quiet"])
    assert "evf_bytes" not in summary and not (out / "evf_demo").exists()
    args = ["--model", str(out), "--new", "--seed", "5", "--steps", "2", "--images", "2",
            "--prompts", "2", "--warmup", "1", "--log-every", "1", "--quiet", "--threads", "1",
            "--pool", "3"]
    text.main(args)
    assert {f.name for f in (out / "evf_demo").iterdir()} >= {
        "config.json", "model.safetensors", "sentencepiece.bpe.model"}
    first = read_hf_weights(out / "evf_demo")
    sam = torch.load(out / "sam_demo.pth", weights_only=True)
    for name, value in first.items():
        if name.startswith(text.ENCODER):
            assert torch.equal(value, sam[name.removeprefix("visual_model.")])
    text.main(args)
    again = read_hf_weights(out / "evf_demo")
    assert all(torch.equal(first[k], again[k]) for k in first)
    passes = json.loads((out / "text_summary.json").read_text())
    assert len(passes) == 1 and passes[0]["args"]["new"]
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows[-2:]] == ["evf", "evf"]
    profile = {"name": "t", "sam": {"checkpoint": str(out / "sam_demo.pth"), "variant": "demo"},
               "text_model": {"checkpoint": str(out / "evf_demo")}}
    res = BiPromptPipeline.from_profile(profile).segment(
        np.full((256, 256, 3), 120, np.uint8), [[100, 100]], text="the red circle")
    assert "text" in res.expert_masks


def test_text_pool_batches_pair_each_expression_with_its_objects_target(monkeypatch):
    """batches.TextPool: scenes drawn and encoded once; a batch pairs each expression with the
    scene it was drawn from, and its target is exactly the soft half-size target a fresh batch's
    loss sees (mask_losses area-averages the full-size mask)."""
    import torch.nn.functional as F

    from biprompt.preprocess import beit3_input, sam_resize

    drawn = []
    real = batches.generate_scene
    monkeypatch.setattr(batches, "generate_scene",
                        lambda rng, h, w, **kw: drawn.append(real(rng, h, w, **kw)) or drawn[-1])
    encoded = [0]

    def encoder(x):  # stands in for the frozen image encoder: each scene's row holds its index
        out = torch.arange(encoded[0], encoded[0] + len(x), dtype=torch.float32).view(-1, 1, 1, 1)
        encoded[0] += len(x)
        return out

    pool = batches.TextPool(encoder, 10, np.random.default_rng(2), 256, 128, batch=4)
    assert len(pool) == len(drawn) == encoded[0] == 10
    emb, beit, texts, target, patches = pool.batch(np.random.default_rng(3), 6, 3)
    assert patches is None  # a pool built without a grid
    assert emb.shape[0] == beit.shape[0] == len(texts) == 18 and target.shape == (18, 1, 128, 128)
    assert len({int(v) for v in emb[:, 0, 0, 0]}) > 1
    for i, text in enumerate(texts):
        scene = drawn[int(emb[i, 0, 0, 0])]
        (t,) = resolve(scene, text)
        x = sam_resize(scene.image, 256)
        full = batches._gt_frame(scene.objects[t].mask, (x.shape[-2], x.shape[-1]), 256)
        assert torch.equal(target[i, 0], F.avg_pool2d(full[None, None], 2)[0, 0])
        assert torch.equal(beit[i], beit3_input(scene.image, 128)[0])
    with pytest.raises(ValueError, match="at least one scene"):
        batches.TextPool(encoder, 0, np.random.default_rng(0), 256, 128)


def test_text_pool_distinct_batches_name_every_object_before_repeating_one():
    """TextPool.batch(distinct=True): a scene's prompts name min(prompts, objects) different
    objects, and every object is still drawn. Without it the draws are the stream they were."""
    import collections

    encoded = [0]

    def encoder(x):  # each scene's embedding holds its index, as in the test above
        out = torch.arange(encoded[0], encoded[0] + len(x), dtype=torch.float32).view(-1, 1, 1, 1)
        encoded[0] += len(x)
        return out

    pool = batches.TextPool(encoder, 40, np.random.default_rng(5), 256, 128, batch=8)
    rng = np.random.default_rng(6)
    named = collections.Counter()
    sizes = set()
    for _ in range(25):
        emb, _, texts, _, _ = pool.batch(rng, 8, 4, distinct=True)
        for i in range(0, len(texts), 4):
            scene = {int(v) for v in emb[i:i + 4, 0, 0, 0]}
            assert len(scene) == 1  # a scene's prompts are consecutive
            own = pool.objects[scene.pop()]
            # an expression names one object of its scene, so equal texts are the same object
            by_text = {pool.texts[o]: o for o in own}
            picked = [by_text[t] for t in texts[i:i + 4]]
            assert len(set(picked)) == min(4, len(own))
            sizes.add(len(own))
            named.update(picked)
    assert {2, 5} <= sizes  # scenes with fewer and with more objects than prompts were drawn
    assert len(named) > 0.9 * len(pool.texts)
    a = pool.batch(np.random.default_rng(9), 6, 3)
    b = pool.batch(np.random.default_rng(9), 6, 3, distinct=False)
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


def test_a_pool_with_a_grid_adds_each_objects_patch_target_and_draws_the_same_scenes():
    """TextPool(grid=8): each row's patch target is its own object's mask as a share of each of
    BEiT-3's 8x8 patches (in BEiT-3's squashed view of the whole canvas, 320x240 included); the
    scenes, expressions and mask targets are those of a pool without a grid."""
    def encoder(x):
        return torch.zeros(len(x), 1, 1, 1)

    plain = batches.TextPool(encoder, 12, np.random.default_rng(4), 256, 128, batch=4)
    gridded = batches.TextPool(encoder, 12, np.random.default_rng(4), 256, 128, batch=4, grid=8)
    a = plain.batch(np.random.default_rng(8), 6, 3)
    b = gridded.batch(np.random.default_rng(8), 6, 3)
    assert a.texts == b.texts and torch.equal(a.target, b.target) and torch.equal(a.beit, b.beit)
    assert b.patches.shape == (18, 8, 8)
    assert ((b.patches >= 0) & (b.patches <= 1)).all()

    mask = np.zeros((240, 320), bool)
    mask[0:30, 0:40] = True  # the top-left patch of the squashed view, exactly
    mask[120:135, 280:320] = True  # half of the patch at row 4, column 7
    t = batches.patch_target(mask, 8)
    assert t[0, 0] == 1 and abs(float(t[4, 7]) - 0.5) < 1e-6
    assert abs(float(t.sum()) - 1.5) < 1e-5


def test_grounding_loss_prefers_the_patches_the_object_covers():
    from biprompt.train.grounding import GroundingHead, grounding_loss

    target = torch.zeros(2, 8, 8)
    target[:, 2, 3] = 1.0
    right = torch.full((2, 8, 8), -6.0)
    right[:, 2, 3] = 6.0
    wrong = torch.full((2, 8, 8), -6.0)
    wrong[:, 5, 5] = 6.0
    assert grounding_loss(right, target) < 0.1 < 0.5 < grounding_loss(wrong, target)
    head = GroundingHead(16, 8)
    fused = torch.zeros(2, 1 + 64 + 5, 16)
    fused[:, 1 + 2 * 8 + 3] = 1.0  # the token of patch (2, 3): after CLS, row-major
    with torch.no_grad():
        head.proj.weight.fill_(1.0)
        head.proj.bias.zero_()
    out = head(fused)
    assert out.shape == (2, 8, 8) and out[0, 2, 3] == 16 and out.abs().sum() == 32


def test_the_grounding_loss_trains_the_text_expert_and_leaves_its_layout_as_it_was(tmp_path):
    """text --new --grounding: same checkpoint keys as without it (the head is dropped), other
    weights (the loss reached BEiT-3), its value in the log; refused without a pool."""
    from biprompt.models.evf_loading import read_hf_weights
    from biprompt.train import text

    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--sam-steps", "1", "--evf-steps", "0", "--images", "2",
               "--prompts", "2", "--quiet"])
    args = ["--model", str(out), "--new", "--seed", "5", "--steps", "2", "--images", "2",
            "--prompts", "2", "--warmup", "1", "--log-every", "1", "--quiet", "--threads", "1",
            "--pool", "3"]
    text.main(args)
    plain = read_hf_weights(out / "evf_demo")
    text.main([*args, "--grounding", "1"])
    grounded = read_hf_weights(out / "evf_demo")
    assert set(plain) == set(grounded)
    changed = {k for k in plain if not torch.equal(plain[k], grounded[k])}
    assert any(k.startswith("mm_extractor.beit3.") for k in changed)
    assert not any(k.startswith(text.ENCODER) for k in changed)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert "grounding" in rows[-1] and "grounding" not in rows[-3] and rows[-1]["grounding"] > 0
    with pytest.raises(SystemExit, match="--pool"):
        text.main(["--model", str(out), "--new", "--steps", "1", "--grounding", "1", "--quiet"])
