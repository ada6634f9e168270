// The demo page: open an image (uploaded once through /v1/embed, then named by image_id),
// click / shift-click / drag a box, type an expression, and see the selected mask, SAM's three
// candidates, the text mask and why one candidate won. Every mask comes as COCO RLE.
// "Use as reference" keeps the current mask as an example: on every later image (until "No
// reference") the reference expert votes too, "things like this one".

import { api, ApiError, blobToBase64 } from "./api.js";
import { binaryImage, focus, maskImage, spotlight } from "./masks.js";
import { area, decodeRle } from "./rle.js";

const MAX_STAGE = { width: 720, height: 560 }; // CSS px
const DRAG_PX = 4; // a press that moves further than this is a box, not a click
const TINT = [30, 144, 255]; // the selected mask
const CANDIDATE_EDGE = [255, 255, 255]; // thumbnails: the image dimmed outside the mask
const TEXT_EDGE = [255, 215, 0];
const REFERENCE_EDGE = [236, 72, 153];

const $ = (id) => document.getElementById(id);
const els = {
  stage: $("stage"), image: $("image-layer"), mask: $("mask-layer"), marks: $("marks-layer"),
  dropHint: $("drop-hint"), headline: $("headline"), samples: $("samples"), file: $("file"),
  imageName: $("image-name"), textForm: $("text-form"), text: $("text"), undo: $("undo"),
  clear: $("clear"), png: $("download-png"), rle: $("download-rle"), status: $("status"),
  error: $("error"), why: $("why"), reason: $("reason"), decision: $("decision"),
  candidates: $("candidates"), timings: $("timings"), keyForm: $("key-form"),
  apiKey: $("api-key"), serverInfo: $("server-info"), useReference: $("use-reference"),
  clearReference: $("clear-reference"), referenceInfo: $("reference-info"),
};

const state = {
  image: null, // {id, name, width, height, bitmap}
  points: [], // [{x, y, label}] in image pixels
  box: null, // [x0, y0, x1, y1]
  history: [], // one {points, box, answer} per answer drawn, for undo and refinement
  reference: null, // {imageId, name, mask (COCO RLE)}: the example every later image is asked for
  busy: false,
};

const apiKey = () => els.apiKey.value.trim();

// --- busy state and errors ------------------------------------------------------------------

async function busy(what, work) {
  if (state.busy) return undefined;
  state.busy = true;
  document.body.dataset.busy = "1";
  document.body.setAttribute("aria-busy", "true");
  els.status.textContent = what;
  els.status.classList.add("working");
  showError(null);
  try {
    return await work();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    state.busy = false;
    document.body.dataset.busy = "0";
    document.body.removeAttribute("aria-busy");
    els.status.classList.remove("working");
    els.status.textContent = "";
  }
}

function showError(err) {
  els.error.hidden = !err;
  if (!err) { els.error.textContent = ""; return; }
  const head = err instanceof ApiError && err.status ? `${err.status} ${err.type}` : "error";
  els.error.replaceChildren(
    Object.assign(document.createElement("strong"), { textContent: `${head}: ` }),
    Object.assign(document.createElement("span"), { className: "message",
                                                    textContent: err.message }));
  if (err.requestId) {
    els.error.append(Object.assign(document.createElement("small"),
                                   { textContent: ` (request ${err.requestId})` }));
  }
  if (err.status === 401) els.error.append(" Set the API key under \"Server\".");
}

// --- opening an image -----------------------------------------------------------------------

async function openImage(blob, name) {
  await busy("Uploading and encoding the image…", async () => {
    const info = await api("v1/embed", { image: await blobToBase64(blob) }, apiKey());
    // the server applies EXIF orientation, and so does createImageBitmap here
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
    state.image = { id: info.image_id, name, width: info.width, height: info.height, bitmap };
    resetPrompts();
    layout(); // and draws
    els.imageName.textContent = `${name}: ${info.width}x${info.height}, embedding ` +
      `${info.cache} (${Math.round(info.timings_ms.total)} ms)`;
    els.stage.dataset.imageId = info.image_id;
  });
}

async function openSample(sample) {
  const res = await fetch(new URL(`samples/${sample.file}`, import.meta.url));
  els.text.placeholder = `e.g. "${sample.expression}"`;
  await openImage(await res.blob(), sample.file);
}

function layout() {
  const { width: w, height: h, bitmap } = state.image;
  let scale = Math.min(MAX_STAGE.width / w, MAX_STAGE.height / h);
  if (scale > 1) scale = Math.floor(scale); // whole pixels when enlarging
  els.stage.style.width = `${Math.round(w * scale)}px`;
  els.stage.style.height = `${Math.round(h * scale)}px`;
  for (const c of [els.image, els.mask]) { c.width = w; c.height = h; }
  els.image.getContext("2d").drawImage(bitmap, 0, 0, w, h);
  const dpr = window.devicePixelRatio || 1;
  els.marks.width = Math.round(w * scale * dpr);
  els.marks.height = Math.round(h * scale * dpr);
  els.stage.hidden = false;
  els.dropHint.hidden = true;
  draw();
}

// --- prompts --------------------------------------------------------------------------------

function resetPrompts() {
  state.points = [];
  state.box = null;
  state.history = [];
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function last() {
  return state.history.length ? state.history[state.history.length - 1] : null;
}

/** The request for the current prompts; `refine`: send the previous answer's logits. */
function segmentBody(refine) {
  const body = {
    image_id: state.image.id, mode: mode(),
    points: state.points.map((p) => [p.x, p.y]), point_labels: state.points.map((p) => p.label),
    return_candidates: true, return_text_mask: true, logits: "id",
  };
  if (state.box) body.box = state.box;
  const text = els.text.value.trim();
  if (text) body.text = text;
  if (state.reference) {
    body.reference = { image_id: state.reference.imageId, mask: state.reference.mask };
    body.return_expert_masks = true;
  }
  const prev = last();
  if (refine && prev && prev.answer.logits_id) body.mask_input_id = prev.answer.logits_id;
  return body;
}

/** Send the current prompts; on an error the prompts go back to the last answer's. */
async function segment(refine) {
  if (!state.image) return;
  const body = segmentBody(refine);
  await busy("Segmenting…", async () => {
    try {
      const answer = await api("v1/segment", body, apiKey());
      state.history.push({ points: [...state.points], box: state.box, answer });
      // what the browser tier (tests/browser) checks the drawing against
      els.stage.dataset.request = JSON.stringify(body);
      els.stage.dataset.logitsId = answer.logits_id || "";
      draw();
      document.body.dataset.seq = String(Number(document.body.dataset.seq) + 1);
    } catch (err) {
      const prev = last();
      state.points = prev ? [...prev.points] : [];
      state.box = prev ? prev.box : null;
      draw();
      throw err;
    }
  });
}

function useAsReference() {
  const answer = last() && last().answer;
  if (state.busy || !answer || !answer.mask) return;
  const mask = { size: answer.mask.size, counts: answer.mask.counts };
  state.reference = { imageId: state.image.id, name: state.image.name, mask };
  els.stage.dataset.reference = JSON.stringify({ image_id: state.image.id, mask });
  renderReference();
}

function renderReference() {
  const ref = state.reference;
  els.referenceInfo.textContent = ref
    ? `Reference: ${ref.name}, ${area(decodeRle(ref.mask))} px. Open another image: objects ` +
      "like it get a vote." : "No reference image.";
  els.clearReference.disabled = !ref;
}

function undo() {
  if (state.busy || !state.history.length) return;
  state.history.pop();
  const prev = last();
  state.points = prev ? [...prev.points] : [];
  state.box = prev ? prev.box : null;
  draw();
}

// Pointer: a press that stays put is a point (negative with shift or the right button); one
// that moves is a box.
let press = null;

function imagePoint(event) {
  const r = els.marks.getBoundingClientRect();
  const { width: w, height: h } = state.image;
  const x = Math.floor((event.clientX - r.left) * w / r.width);
  const y = Math.floor((event.clientY - r.top) * h / r.height);
  return { x: Math.min(w - 1, Math.max(0, x)), y: Math.min(h - 1, Math.max(0, y)) };
}

function onPointerDown(event) {
  if (!state.image || state.busy || (event.button !== 0 && event.button !== 2)) return;
  event.preventDefault();
  els.marks.setPointerCapture(event.pointerId);
  press = { start: imagePoint(event), x: event.clientX, y: event.clientY, drag: null,
            negative: event.shiftKey || event.button === 2 };
}

function onPointerMove(event) {
  if (!press) return;
  if (!press.drag && Math.hypot(event.clientX - press.x, event.clientY - press.y) <= DRAG_PX) {
    return;
  }
  const p = imagePoint(event);
  const s = press.start;
  press.drag = [Math.min(s.x, p.x), Math.min(s.y, p.y), Math.max(s.x, p.x), Math.max(s.y, p.y)];
  drawMarks(press.drag);
}

function onPointerUp(event) {
  if (!press) return;
  const done = press;
  press = null;
  if (done.drag) {
    state.box = done.drag;
  } else {
    state.points.push({ ...done.start, label: done.negative ? 0 : 1 });
  }
  drawMarks();
  segment(true);
  event.preventDefault();
}

// --- drawing --------------------------------------------------------------------------------

/** The selected mask on the mask layer, the prompts on the marks layer, and the panel. */
function draw() {
  if (!state.image) return;
  const { width: w, height: h } = state.image;
  const answer = last() && last().answer;
  const mctx = els.mask.getContext("2d", { willReadFrequently: true });
  mctx.clearRect(0, 0, w, h);
  let selected = null;
  if (answer && answer.mask) {
    selected = decodeRle(answer.mask);
    mctx.putImageData(maskImage(selected, w, h, TINT), 0, 0);
  }
  drawMarks();
  renderHeadline(answer, selected);
  renderWhy(answer);
  els.png.disabled = els.rle.disabled = els.useReference.disabled = !selected;
  els.undo.disabled = !state.history.length;
}

function drawMarks(dragBox = null) {
  const ctx = els.marks.getContext("2d");
  const sx = els.marks.width / state.image.width;
  const sy = els.marks.height / state.image.height;
  const dpr = window.devicePixelRatio || 1;
  ctx.clearRect(0, 0, els.marks.width, els.marks.height);
  const box = dragBox || state.box;
  if (box) {
    ctx.lineWidth = 2 * dpr;
    ctx.strokeStyle = "#ffd400";
    ctx.setLineDash(dragBox ? [6 * dpr, 4 * dpr] : []);
    ctx.strokeRect(box[0] * sx, box[1] * sy, (box[2] - box[0] + 1) * sx,
                   (box[3] - box[1] + 1) * sy);
    ctx.setLineDash([]);
  }
  for (const p of state.points) {
    const cx = (p.x + 0.5) * sx;
    const cy = (p.y + 0.5) * sy;
    ctx.beginPath();
    ctx.arc(cx, cy, 6 * dpr, 0, 2 * Math.PI);
    ctx.fillStyle = p.label ? "#22c55e" : "#ef4444";
    ctx.fill();
    ctx.lineWidth = 2 * dpr;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function fmt(x, digits = 2) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function renderHeadline(answer, selected) {
  if (!answer) {
    els.headline.textContent = state.image ? "Click the object you want." : "";
    return;
  }
  const pick = answer.selected === null ? "the text mask" : `candidate ${answer.selected}`;
  const pixels = selected ? area(selected) : 0;
  const experts = answer.expert_agreement === null || answer.expert_agreement === undefined
    ? "" : ` · experts agree ${fmt(answer.expert_agreement)}`;
  els.headline.textContent = `${pixels} px · ${pick} · ${answer.strategy} · ` +
    `agreement ${fmt(answer.agreement)}${experts} · ${Math.round(answer.timings_ms.total)} ms ` +
    `· embedding cache ${answer.cache}`;
}

function thumbnail(mask, tint, region, title, lines, chosen) {
  const { width: w, height: h, bitmap } = state.image;
  const figure = document.createElement("figure");
  figure.className = chosen ? "candidate chosen" : "candidate";
  const full = new OffscreenCanvas(w, h);
  const fctx = full.getContext("2d");
  fctx.drawImage(bitmap, 0, 0, w, h);
  if (mask) {
    const layer = new OffscreenCanvas(w, h);
    layer.getContext("2d").putImageData(spotlight(mask, w, h, tint), 0, 0);
    fctx.drawImage(layer, 0, 0);
  }
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = Math.min(region.side, 256);
  canvas.getContext("2d").drawImage(full, region.x, region.y, region.side, region.side,
                                    0, 0, canvas.width, canvas.height);
  const caption = document.createElement("figcaption");
  caption.append(Object.assign(document.createElement("b"), { textContent: title }));
  for (const line of lines) caption.append(document.createElement("br"), line);
  figure.append(canvas, caption);
  return figure;
}

/** One sentence: why this mask (the strategies of biprompt/selection.py). */
function reason(answer) {
  const cands = answer.candidates;
  const top = cands.length ? cands.reduce((a, b) => (b.predicted_iou > a.predicted_iou ? b : a))
    : null;
  const samTop = top ? `SAM's top-scoring candidate (${top.index})` : "SAM's mask";
  switch (answer.strategy) {
    case "biprompt": {
      const own = top && top.index !== answer.selected ? `; SAM alone would have picked ` +
        `candidate ${top.index}` : "";
      const voters = cands.length ? Object.keys(cands[0].expert_ious || { text: 0 }) : ["text"];
      const which = voters.length > 1 ? `the ${voters.join(" and ")} masks (their weighted ` +
        `mean IoU ${fmt(answer.agreement)})` : `the ${voters[0]} mask (IoU ` +
        `${fmt(answer.agreement)})`;
      return `Candidate ${answer.selected} agrees best with ${which}${own}.`;
    }
    case "fallback_no_text": return `No text: ${samTop}.`;
    case "fallback_empty_text": return `The text mask is empty: ${samTop}.`;
    case "fallback_low_agreement":
      return `No candidate agrees with the text mask (best IoU ${fmt(answer.agreement)}, under ` +
        `the server's threshold): ${samTop}.`;
    case "point": return `Point mode: ${samTop}.`;
    case "text": return "Text mode: EVF-SAM's mask.";
    case "reference": return "Reference mode: the reference expert's mask, objects like the " +
      "reference image's.";
    default: return answer.strategy;
  }
}

function renderWhy(answer) {
  els.reason.textContent = answer ? reason(answer) : "";
  els.decision.replaceChildren();
  els.candidates.replaceChildren();
  els.timings.replaceChildren();
  if (!answer) return;
  const facts = [
    ["strategy", answer.strategy], ["selected", answer.selected ?? "–"],
    ["agreement", fmt(answer.agreement, 3)], ["mode", answer.mode],
    ["embedding cache", answer.cache], ["text mask cache", answer.text_cache ?? "–"],
    ["reference mask cache", answer.reference_cache ?? "–"],
    ["experts agree", fmt(answer.expert_agreement, 3)],
    ["image id", answer.image_id.slice(0, 12) + "…"], ["request id", answer.request_id],
  ];
  for (const [k, v] of facts) {
    els.decision.append(Object.assign(document.createElement("dt"), { textContent: k }),
                        Object.assign(document.createElement("dd"), { textContent: String(v) }));
  }
  const { width: w, height: h } = state.image;
  const cands = answer.candidates.map((c) => ({ ...c, bits: c.mask && decodeRle(c.mask) }));
  const textMask = answer.text_mask && decodeRle(answer.text_mask);
  const refMask = answer.reference_mask && decodeRle(answer.reference_mask);
  const region = focus([...cands.map((c) => c.bits), textMask, refMask].filter(Boolean), w, h);
  for (const c of cands) {
    const chosen = c.index === answer.selected;
    const lines = [`predicted IoU ${fmt(c.predicted_iou)}`, `IoU with text ${fmt(c.text_iou)}`];
    if (c.expert_ious && "reference" in c.expert_ious) {
      lines.push(`IoU with reference ${fmt(c.expert_ious.reference)}`);
    }
    els.candidates.append(thumbnail(c.bits, CANDIDATE_EDGE, region,
                                    `candidate ${c.index}${chosen ? " (selected)" : ""}`,
                                    lines, chosen));
  }
  const alone = answer.selected === null;
  if (textMask) {
    els.candidates.append(thumbnail(textMask, TEXT_EDGE, region, "text mask",
                                    [alone && answer.mode === "text" ? "(selected)" : "EVF-SAM"],
                                    alone && answer.mode === "text"));
  }
  if (refMask) {
    const chosen = alone && answer.mode === "reference";
    els.candidates.append(thumbnail(refMask, REFERENCE_EDGE, region, "reference mask",
                                    [chosen ? "(selected)" : "things like the reference"],
                                    chosen));
  }
  for (const [k, v] of Object.entries(answer.timings_ms)) {
    const row = els.timings.insertRow();
    row.insertCell().textContent = k;
    row.insertCell().textContent = `${fmt(v, 1)} ms`;
  }
  els.why.querySelector("summary").textContent =
    `Why this mask: ${answer.strategy}, agreement ${fmt(answer.agreement)}`;
}

// --- downloads ------------------------------------------------------------------------------

function save(blob, filename) {
  const a = Object.assign(document.createElement("a"),
                          { href: URL.createObjectURL(blob), download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

function baseName() {
  return state.image.name.replace(/\.[^.]*$/, "") || "image";
}

function downloadPng() {
  const answer = last() && last().answer;
  if (!answer || !answer.mask) return;
  const { width: w, height: h } = state.image;
  const mask = decodeRle(answer.mask);
  const canvas = Object.assign(document.createElement("canvas"), { width: w, height: h });
  const img = binaryImage(mask, w, h);
  canvas.getContext("2d").putImageData(img, 0, 0);
  canvas.toBlob((blob) => save(blob, `${baseName()}-mask.png`), "image/png");
}

function downloadRle() {
  const answer = last() && last().answer;
  if (!answer || !answer.mask) return;
  // the server's mask is already COCO compressed RLE, as pycocotools writes it
  const rle = { size: answer.mask.size, counts: answer.mask.counts };
  save(new Blob([JSON.stringify(rle)], { type: "application/json" }),
       `${baseName()}-mask.rle.json`);
}

// --- wiring ---------------------------------------------------------------------------------

async function loadSamples() {
  const res = await fetch(new URL("samples/samples.json", import.meta.url));
  for (const sample of await res.json()) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "sample";
    button.dataset.sample = sample.file;
    button.title = `${sample.title}: try "${sample.expression}"`;
    button.append(Object.assign(document.createElement("img"), {
      src: new URL(`samples/${sample.file}`, import.meta.url).href, alt: sample.title }));
    button.addEventListener("click", () => openSample(sample));
    els.samples.append(button);
  }
}

async function loadServerInfo() {
  try {
    const info = await api("v1/models", undefined, apiKey());
    els.serverInfo.textContent = `SAM ${info.model.sam}, text ${info.model.text ?? "none"}, ` +
      `reference ${info.model.reference ?? "none"}; ` +
      `at most ${info.limits.max_text_chars} characters of text; cache: ${info.cache}`;
  } catch (err) {
    els.serverInfo.textContent = `GET /v1/models: ${err.message}`;
  }
}

function wire() {
  els.marks.addEventListener("pointerdown", onPointerDown);
  els.marks.addEventListener("pointermove", onPointerMove);
  els.marks.addEventListener("pointerup", onPointerUp);
  els.marks.addEventListener("pointercancel", () => { press = null; drawMarks(); });
  els.marks.addEventListener("contextmenu", (e) => e.preventDefault());
  els.textForm.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!state.image) {
      els.headline.textContent = "Open an image first.";
    } else if (state.points.length || state.box || mode() === "text" ||
               (mode() === "reference" && state.reference)) {
      segment(false);
    } else {
      els.headline.textContent = "Click the object first, or switch to text mode.";
    }
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => { if (state.history.length) segment(false); });
  }
  els.file.addEventListener("change", () => {
    const f = els.file.files[0];
    if (f) openImage(f, f.name);
    els.file.value = "";
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    const f = [...e.dataTransfer.files].find((x) => x.type.startsWith("image/"));
    if (f) openImage(f, f.name);
  });
  els.undo.addEventListener("click", undo);
  els.clear.addEventListener("click", () => {
    if (state.busy) return;
    resetPrompts();
    draw();
  });
  els.useReference.addEventListener("click", useAsReference);
  els.clearReference.addEventListener("click", () => {
    state.reference = null;
    delete els.stage.dataset.reference;
    renderReference();
  });
  els.png.addEventListener("click", downloadPng);
  els.rle.addEventListener("click", downloadRle);
  els.apiKey.value = sessionStorage.getItem("biprompt-api-key") || "";
  const keyChanged = (e) => {
    e.preventDefault();
    sessionStorage.setItem("biprompt-api-key", els.apiKey.value.trim());
    loadServerInfo();
  };
  els.apiKey.addEventListener("change", keyChanged);
  els.keyForm.addEventListener("submit", keyChanged);
  els.png.disabled = els.rle.disabled = els.undo.disabled = els.useReference.disabled = true;
  renderReference();
}

wire();
await Promise.all([loadSamples(), loadServerInfo()]);
document.body.dataset.ready = "1";
