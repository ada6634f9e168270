// Binary masks (Uint8Array, row-major, 1 inside) -> pixels to draw.

/** Is pixel k of a w-wide mask on its edge (in the mask, a 4-neighbour outside it)? */
function onEdge(mask, k, w, h) {
  const x = k % w;
  const y = (k - x) / w;
  return x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
    !mask[k - 1] || !mask[k + 1] || !mask[k - w] || !mask[k + w];
}

/** The mask tinted, its edge opaque; nothing outside it (alpha 0 there and only there). */
export function maskImage(mask, w, h, [r, g, b]) {
  const img = new ImageData(w, h);
  for (let k = 0; k < mask.length; k++) {
    if (!mask[k]) continue;
    img.data.set([r, g, b, onEdge(mask, k, w, h) ? 255 : 110], 4 * k);
  }
  return img;
}

/** The mask as an opaque black-and-white image (255 inside): the PNG download. */
export function binaryImage(mask, w, h) {
  const img = new ImageData(w, h);
  for (let k = 0; k < mask.length; k++) {
    const v = mask[k] ? 255 : 0;
    img.data.set([v, v, v, 255], 4 * k);
  }
  return img;
}

/** For thumbnails: the image dimmed outside the mask, the mask's edge drawn. */
export function spotlight(mask, w, h, [r, g, b]) {
  const img = new ImageData(w, h);
  for (let k = 0; k < mask.length; k++) {
    if (!mask[k]) img.data.set([0, 0, 0, 170], 4 * k);
    else if (onEdge(mask, k, w, h)) img.data.set([r, g, b, 255], 4 * k);
  }
  return img;
}

/** The square region around every mask of an answer (padded): what the thumbnails show. */
export function focus(masks, w, h) {
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (const mask of masks) {
    for (let k = 0; k < mask.length; k++) {
      if (!mask[k]) continue;
      const x = k % w;
      const y = (k - x) / w;
      if (x < x0) x0 = x;
      if (x > x1) x1 = x;
      if (y < y0) y0 = y;
      if (y > y1) y1 = y;
    }
  }
  if (x1 < 0) return { x: 0, y: 0, side: Math.max(w, h) };
  const side = Math.min(Math.max(w, h), Math.ceil(Math.max(x1 - x0, y1 - y0, 16) * 1.4));
  const clamp = (v, n) => Math.max(0, Math.min(v, Math.max(0, n - side)));
  return { x: clamp(Math.round((x0 + x1 - side) / 2), w),
           y: clamp(Math.round((y0 + y1 - side) / 2), h), side };
}
