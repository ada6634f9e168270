"""The demo page in headless Chromium against the real app (demo profile): what the page draws is
what the API answers, pixel for pixel, read back from the page's mask canvas.

Run alone: `.venv/bin/python -m pytest -q tests/browser` (about 30 s: 20 s to start the app, 5 to
stop it, 5 for the tests).
BIPROMPT_UPDATE_SCREENSHOT=1 also writes the README's screenshot, docs/screenshots/demo-page.png.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from biprompt_client import rle
from biprompt_client.schema import MAX_TEXT_CHARS
from PIL import Image

from tests.browser.samples import BUNDLED, SAMPLES_DIR

WAIT_S = 60.0  # every wait on the page is bounded by this
SAMPLE = next(b for b in BUNDLED if b.name == "square-and-circle")
TEXT = "the red square"
# On SAMPLE (a red square with a small blue circle inside it): a click on the circle is ambiguous
# (circle, or the square around it?) and the text picks the square; a click on the square beside
# the circle, then a negative click on the circle, cuts the circle out.
ON_CIRCLE = (204, 84)
ON_SQUARE = (237, 57)
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = "demo-page.png"


@pytest.fixture(scope="module")
def page(demo_app, driver):
    """The driver, with the helpers the tests share."""
    return Page(driver, demo_app.page_url)


class Page:
    def __init__(self, driver, url: str):
        self.d, self.url = driver, url

    def js(self, script: str, *args):
        return self.d.execute_script(script, *args)

    def until(self, what: str, condition) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.d, WAIT_S, poll_frequency=0.05).until(
            lambda _: condition(), message=f"waited {WAIT_S:.0f} s for {what}")

    def el(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def seq(self) -> int:
        return int(self.js("return document.body.dataset.seq"))

    def idle(self) -> bool:
        return self.js("return document.body.dataset.busy") == "0"

    def open_sample(self, name: str) -> str:
        """A fresh page with a bundled sample opened; the image's id."""
        self.d.get(self.url)
        self.until("the page to start", lambda: self.js("return document.body.dataset.ready"))
        self.el(f'button[data-sample="{name}"]').click()
        self.until("the image's embedding",
                   lambda: self.idle() and self.el("#stage").get_attribute("data-image-id"))
        return self.el("#stage").get_attribute("data-image-id")

    def type_text(self, text: str, submit: bool = False) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.el("#text")
        box.clear()
        box.send_keys(text + (Keys.ENTER if submit else ""))

    def click_pixel(self, x: int, y: int, negative: bool = False) -> None:
        """A click on the centre of image pixel (x, y), shift held for a negative point."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        canvas = self.el("#marks-layer")
        rect = canvas.rect
        w, h = self.js("const c = document.getElementById('image-layer'); "
                       "return [c.width, c.height]")
        # offsets from the element's centre, as W3C actions take them
        dx = round((x + 0.5) * rect["width"] / w - rect["width"] / 2)
        dy = round((y + 0.5) * rect["height"] / h - rect["height"] / 2)
        chain = ActionChains(self.d)
        if negative:
            chain.key_down(Keys.SHIFT)
        chain.move_to_element_with_offset(canvas, dx, dy).click()
        if negative:
            chain.key_up(Keys.SHIFT)
        chain.perform()

    def segmented(self, before: int) -> dict:
        """Wait for the answer after `before` to be drawn; the request the page sent."""
        self.until("the overlay", lambda: self.seq() > before and self.idle())
        return json.loads(self.el("#stage").get_attribute("data-request"))

    def drawn_mask(self) -> np.ndarray:
        """The mask layer's pixels: a pixel is in the drawn mask when it is not transparent."""
        h, w, bits = self.js("""
            const c = document.getElementById('mask-layer');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const out = new Array(c.width * c.height);
            for (let k = 0; k < out.length; k++) out[k] = px[4 * k + 3] ? '1' : '0';
            return [c.height, c.width, out.join('')];""")
        return (np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")).reshape(h, w)


def out_dir() -> Path:
    """Where the tier's screenshots go (out/ is not committed)."""
    folder = REPO / "out/browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def api_segment(base_url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/segment", json=body, timeout=WAIT_S)


def test_page_is_public_and_self_contained(demo_app, page):
    r = httpx.get(f"{demo_app.base_url}/", follow_redirects=False, timeout=WAIT_S)
    assert r.status_code == 307 and r.headers["location"] == "/demo/"
    page.open_sample(SAMPLE.file)
    origin = demo_app.base_url
    loaded = page.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(origin + "/") for u in loaded), loaded  # no CDN
    assert {u.removeprefix(origin) for u in loaded} >= {
        "/demo/static/app.js", "/demo/static/api.js", "/demo/static/masks.js",
        "/demo/static/rle.js", "/demo/static/style.css",
        "/v1/embed", "/v1/models", f"/demo/static/samples/{SAMPLE.file}"}
    errors = [e for e in page.d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_click_and_text_draw_the_api_mask(demo_app, page, tmp_path):
    image_id = page.open_sample(SAMPLE.file)
    # the drawn image is the bundled PNG, pixel for pixel
    shown = page.js("const c = document.getElementById('image-layer');"
                    "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                    ".data)")
    png = np.asarray(Image.open(SAMPLES_DIR / SAMPLE.file).convert("RGB"))
    assert np.array_equal(np.array(shown, dtype=np.uint8).reshape(*png.shape[:2], 4)[..., :3], png)

    page.js("window.busySeen = []; new MutationObserver(() => window.busySeen.push("
            "[document.body.dataset.busy, document.getElementById('status').textContent]))"
            ".observe(document.body, {attributes: true, attributeFilter: ['data-busy']})")
    page.type_text(TEXT)
    page.click_pixel(*ON_CIRCLE)
    sent = page.segmented(0)
    assert sent["points"] == [list(ON_CIRCLE)] and sent["point_labels"] == [1]
    assert sent["text"] == TEXT and sent["image_id"] == image_id and "mask_input_id" not in sent
    assert ["1", "Segmenting…"] in page.js("return window.busySeen")  # the busy state showed

    body = {"image_id": image_id, "points": [list(ON_CIRCLE)], "point_labels": [1],
            "text": TEXT, "return_candidates": True}
    answer = api_segment(demo_app.base_url, body).json()
    want = rle.decode(answer["mask"])
    drawn = page.drawn_mask()
    assert drawn.shape == want.shape == (SAMPLE.height, SAMPLE.width)
    assert want.sum() > 1000 and np.array_equal(drawn, want)

    # the panel: the three candidates with both scores, the text mask, the decision
    page.el("#why summary").click()
    cards = [c.text for c in page.d.find_elements("css selector", "#candidates figure")]
    assert len(cards) == 4 and cards[3].startswith("text mask")
    for card, cand in zip(cards, answer["candidates"], strict=False):
        assert f"predicted IoU {cand['predicted_iou']:.2f}" in card
        assert f"IoU with text {cand['text_iou']:.2f}" in card
    assert answer["strategy"] == "biprompt" and "(selected)" in cards[answer["selected"]]
    decision = page.el("#decision").text
    assert f"{answer['agreement']:.3f}" in decision and "biprompt" in decision
    assert "total" in page.el("#timings").text

    shot = out_dir() / SCREENSHOT
    page.js("window.scrollTo(0, 0)")
    assert page.d.save_screenshot(str(shot))
    if os.environ.get("BIPROMPT_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs/screenshots").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, REPO / "docs/screenshots" / SCREENSHOT)


def test_downloads_are_the_api_mask(demo_app, page, downloads):
    image_id = page.open_sample(SAMPLE.file)
    page.type_text(TEXT)
    page.click_pixel(*ON_CIRCLE)
    page.segmented(0)
    body = {"image_id": image_id, "points": [list(ON_CIRCLE)], "point_labels": [1], "text": TEXT}
    want = api_segment(demo_app.base_url, body).json()["mask"]
    stem = Path(SAMPLE.file).stem
    for button in ("#download-png", "#download-rle"):
        page.el(button).click()
    png, coco = downloads / f"{stem}-mask.png", downloads / f"{stem}-mask.rle.json"
    page.until("the downloads", lambda: png.is_file() and coco.is_file())
    assert json.loads(coco.read_text()) == want  # COCO RLE, as pycocotools writes it
    # a finished PNG decodes; one still being written may not: bounded retries
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            got = np.asarray(Image.open(png).convert("L"))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert set(np.unique(got)) <= {0, 255}
    assert np.array_equal(got == 255, rle.decode(want))


def test_a_negative_click_refines_and_shrinks(demo_app, page):
    image_id = page.open_sample(SAMPLE.file)
    scene = SAMPLE.scene()
    square, circle = (scene.objects[i].mask for i in scene.nested)
    assert square[ON_SQUARE[1], ON_SQUARE[0]] and not circle[ON_SQUARE[1], ON_SQUARE[0]]
    assert circle[ON_CIRCLE[1], ON_CIRCLE[0]]

    page.type_text(TEXT)
    page.click_pixel(*ON_SQUARE)
    page.segmented(0)
    first = page.drawn_mask()
    logits_id = page.el("#stage").get_attribute("data-logits-id")
    page.click_pixel(*ON_CIRCLE, negative=True)
    sent = page.segmented(1)
    assert sent["points"] == [list(ON_SQUARE), list(ON_CIRCLE)]
    assert sent["point_labels"] == [1, 0] and sent["mask_input_id"] == logits_id  # refinement
    second = page.drawn_mask()
    assert second.sum() < first.sum()
    assert (second & circle).sum() < (first & circle).sum()  # the circle was cut out
    answer = api_segment(demo_app.base_url, sent)  # the same request, sent again
    assert answer.status_code == 200
    assert np.array_equal(second, rle.decode(answer.json()["mask"]))
    assert image_id == sent["image_id"]


def test_over_long_text_shows_the_servers_422(demo_app, page):
    image_id = page.open_sample(SAMPLE.file)
    page.click_pixel(*ON_SQUARE)
    page.segmented(0)
    before = page.drawn_mask()
    text = "a" * (MAX_TEXT_CHARS + 1)
    page.js("document.getElementById('text').value = arguments[0]", text[:-1])
    page.el("#text").send_keys("a")  # typed: the page does not cut the text short
    page.el("#run").click()
    page.until("the error", lambda: page.idle() and page.el("#error").is_displayed())
    r = api_segment(demo_app.base_url, {"image_id": image_id, "points": [list(ON_SQUARE)],
                                        "point_labels": [1], "text": text})
    assert r.status_code == 422
    error = r.json()["error"]
    assert page.el("#error .message").text == error["message"]
    assert page.el("#error").text.startswith(f"422 {error['type']}: ")
    assert page.seq() == 1 and np.array_equal(page.drawn_mask(), before)  # the mask stays
    page.d.save_screenshot(str(out_dir() / "demo-page-422.png"))


def test_a_box_drag_sends_a_box(demo_app, page):
    from selenium.webdriver.common.action_chains import ActionChains

    page.open_sample(SAMPLE.file)
    scene = SAMPLE.scene()
    x0, y0, x1, y1 = scene.objects[scene.nested[0]].bbox  # the square, half-open
    canvas = page.el("#marks-layer")
    scale = canvas.rect["width"] / SAMPLE.width
    start = [round((v + 0.5) * scale - canvas.rect[k] / 2)
             for v, k in ((x0, "width"), (y0, "height"))]
    ActionChains(page.d).move_to_element_with_offset(canvas, *start).click_and_hold() \
        .move_by_offset(round((x1 - 1 - x0) * scale), round((y1 - 1 - y0) * scale)) \
        .release().perform()
    sent = page.segmented(0)
    assert sent["box"] == [x0, y0, x1 - 1, y1 - 1] and sent["points"] == []
    answer = api_segment(demo_app.base_url, sent).json()
    assert np.array_equal(page.drawn_mask(), rle.decode(answer["mask"]))


DECODE_JS = """
const [rle, big, done] = arguments;
import(new URL('static/rle.js', location.href).href).then((m) => {
  const [h, w] = rle.size;
  const mask = m.decodeRle(rle);
  if (!big) return done(Array.from(mask).join(''));
  let x0 = w, y0 = h, x1 = -1, y1 = -1;  // a big mask comes back as its area and bbox
  for (let k = 0; k < mask.length; k++) {
    if (!mask[k]) continue;
    const x = k % w, y = (k - x) / w;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
  }
  done([m.area(mask), x0, y0, x1, y1]);
}).catch((e) => done('error: ' + e));
"""


def test_the_pages_rle_decoder_reads_what_python_writes(page):
    """rle.js against biprompt_client.rle (pycocotools' format), in the browser: noise, empty,
    full, and a 12 MP mask whose runs take 5-character values."""
    page.d.get(page.url)
    rng = np.random.default_rng(7)
    for mask in (rng.random((37, 53)) < 0.5, np.zeros((64, 48), bool), np.ones((9, 7), bool),
                 rng.random((1, 200)) < 0.1):
        got = page.d.execute_async_script(DECODE_JS, rle.encode(mask), False)
        assert got == "".join("1" if v else "0" for v in mask.ravel()), got[:80]
    big = np.zeros((3000, 4000), bool)
    big[1500:2999, 3500:4000] = True
    big[0, 0] = True
    got = page.d.execute_async_script(DECODE_JS, rle.encode(big), True)
    assert got == [int(big.sum()), 0, 0, 3999, 2998]


def test_a_reference_votes_on_the_next_image(demo_app, page):
    """"Use as reference" keeps the drawn mask as the example; on the next image the page sends
    it as `reference` and shows the reference expert's mask and each candidate's IoU with it."""
    first_id = page.open_sample(SAMPLE.file)
    page.type_text(TEXT)
    page.click_pixel(*ON_SQUARE)
    page.segmented(0)
    first_mask = page.drawn_mask()
    page.el("#use-reference").click()
    ref = json.loads(page.el("#stage").get_attribute("data-reference"))
    assert ref["image_id"] == first_id and np.array_equal(rle.decode(ref["mask"]), first_mask)
    assert f"Reference: {SAMPLE.file}" in page.el("#reference-info").text

    other = next(b for b in BUNDLED if b.name == "blue-circles")
    page.el(f'button[data-sample="{other.file}"]').click()
    page.until("the second image", lambda: page.idle() and page.el("#stage").get_attribute(
        "data-image-id") not in (None, first_id))
    ys, xs = np.nonzero(other.scene().objects[0].mask)
    point = (int(xs[len(xs) // 2]), int(ys[len(ys) // 2]))
    page.type_text("")
    page.el("#text").clear()
    before = page.seq()
    page.click_pixel(*point)
    sent = page.segmented(before)
    assert sent["reference"] == ref and sent["return_expert_masks"] is True
    assert sent["points"] == [list(point)] and "text" not in sent
    answer = api_segment(demo_app.base_url, sent).json()
    assert np.array_equal(page.drawn_mask(), rle.decode(answer["mask"]))

    page.el("#why summary").click()
    cards = [c.text for c in page.d.find_elements("css selector", "#candidates figure")]
    assert cards[-1].startswith("reference mask")
    for card, cand in zip(cards[:3], answer["candidates"], strict=True):
        assert f"IoU with reference {cand['expert_ious']['reference']:.2f}" in card
    assert "reference mask cache" in page.el("#decision").text

    page.el("#clear-reference").click()
    assert page.el("#reference-info").text == "No reference image."
    before = page.seq()
    page.click_pixel(*point)
    assert "reference" not in page.segmented(before)
