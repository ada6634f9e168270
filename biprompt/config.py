"""Every limit and default of the library and the server, defined once.

The server's typed settings (deployments/settings.py: `AppArgs`) and the model profile
(biprompt/profile.py) take their defaults from here; nothing else repeats these numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- prompts and inputs ---------------------------------------------------------------------
MAX_POINTS = 64  # points per prompt
# Decoded image pixels, checked from the header before decoding. A cost budget: decoding takes
# about 6 bytes of memory at peak and 40 ns of CPU per pixel (a 16 MP PNG: 100 MB, 0.6 s on the
# 2-core dev machine), per request, while SAM sees the image at 1024 on its longest side anyway.
# 32 Mi (33.5 M) takes every photo a phone shoots by default (12-24 MP), 24-33 MP cameras and
# 8K UHD frames (7680x4320); 48-50 MP modes and larger get a 413 that says to downscale.
# Deployments can raise it (AppArgs.max_image_pixels; serve_config.yaml sets 64 Mi).
DEFAULT_MAX_PIXELS = 32 * 1024 * 1024
MAX_TEXT_TOKENS = 64  # tokens of a referring expression, after tokenisation
MAX_TEXT_CHARS = 512  # characters of a referring expression the model accepts

# --- selection ------------------------------------------------------------------------------
DEFAULT_AGREEMENT_THRESHOLD = 0.1  # below this IoU with the text mask, the point wins

# --- cache ----------------------------------------------------------------------------------
CACHE_TTL_S = 86400  # embeddings and text masks, in Redis and in the in-process LRU
LOCAL_CACHE_MB = 512  # bound of the in-process LRU
CACHE_TIMEOUT_S = 0.5  # Redis socket timeout: a slower Redis is a miss
REDIS_COOLDOWN_S = 2.0  # after a Redis failure, serve without it this long, then try again

# --- serving --------------------------------------------------------------------------------
MAX_BODY_MB = 32.0
MAX_BATCH_ITEMS = 256  # items of one /v1/segment/batch call

# --- model profiles -------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = "configs/models/demo.yaml"
PROFILE_ENV = "BIPROMPT_PROFILE"


def resolve_profile_path(path: str | os.PathLike | None = None) -> Path:
    """A model profile's path: absolute as given; relative to the working directory if the file
    is there, else to the repository root (so `configs/models/demo.yaml` works from anywhere in a
    source checkout). None: $BIPROMPT_PROFILE, else the bundled demo profile."""
    raw = path if path not in (None, "") else (os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    p = Path(raw).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO / p).resolve()

# Refinement clicks (a previous mask as SAM's mask_input, or several points): whether each mode
# still asks SAM for three candidates (True: the text mask keeps arbitrating in biprompt mode) or
# takes SAM's single-mask output (False, SAM's own practice). Chosen by `biprompt eval clicks`
# (README "Refinement clicks").
REFINE_MULTIMASK = {"biprompt": True, "point": False, "text": False, "reference": False}
# Low-res logits kept server-side for refinement (`logits_id`): an annotator's next click comes
# within seconds or minutes of the last.
LOGITS_TTL_S = 3600

# --- mask formats ---------------------------------------------------------------------------
# mask_format "polygon" (biprompt/polygons.py): the Douglas-Peucker tolerance in pixels, the
# farthest a traced boundary pixel centre may lie from its simplified ring. At 1 px a disk 100 px
# across keeps IoU 0.994 through the round trip with 24 vertices for its 280 boundary pixels
# (0.5 px: 0.998, 48; 2 px: 0.987, 16), and axis-aligned rectangles stay exact; 0 keeps every
# traced vertex.
POLYGON_TOLERANCE_PX = 1.0
