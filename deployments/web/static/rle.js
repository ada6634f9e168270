// COCO compressed RLE -> a binary mask, as pycocotools' maskApi.c (rleFrString, rleDecode)
// defines it; the Python side is clients/python/biprompt_client/rle.py.
//
// counts: runs of 0s and 1s (starting with 0s) over the mask in column-major order. Each run
// from the third on is stored as its difference to the run two before; each value is written
// in little-endian groups of 5 bits, one character (group + 48) each, with 0x20 set on every
// character but the last, whose 0x10 bit is the sign.

/** Run lengths from a compressed counts string. */
export function runsFromString(counts) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let value = 0;
    let scale = 1; // 32^k: plain arithmetic, since the values may pass 32 bits
    let more = true;
    while (more) {
      if (p >= counts.length) throw new Error("RLE counts end inside a value");
      const c = counts.charCodeAt(p++) - 48;
      value += (c & 0x1f) * scale;
      scale *= 32;
      more = (c & 0x20) !== 0;
      if (!more && (c & 0x10) !== 0) value -= scale; // negative: sign-extend
    }
    if (runs.length > 2) value += runs[runs.length - 2];
    runs.push(value);
  }
  return runs;
}

/** {size: [h, w], counts} -> Uint8Array of h * w, row-major, 1 inside the mask. */
export function decodeRle(rle) {
  const [h, w] = rle.size;
  const runs = typeof rle.counts === "string" ? runsFromString(rle.counts) : rle.counts;
  const mask = new Uint8Array(h * w);
  let i = 0; // index in column-major order
  for (let r = 0; r < runs.length; r++) {
    const end = i + runs[r];
    if (end > h * w || runs[r] < 0) throw new Error("RLE runs do not fit the mask's size");
    if (r % 2 === 1) {
      for (let k = i; k < end; k++) mask[(k % h) * w + Math.floor(k / h)] = 1;
    }
    i = end;
  }
  if (i !== h * w) throw new Error(`RLE covers ${i} pixels of ${h * w}`);
  return mask;
}

/** The number of pixels in a decoded mask. */
export function area(mask) {
  let n = 0;
  for (let k = 0; k < mask.length; k++) n += mask[k];
  return n;
}
