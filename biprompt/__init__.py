"""BiPrompt-SAM core: models, preprocessing, selection, codecs and the in-process pipeline.

Plain torch/numpy; this package never imports ray.
"""

from biprompt import _compat

_compat.install()

from biprompt.errors import BiPromptError  # noqa: E402
from biprompt.pipeline import BiPromptPipeline  # noqa: E402
from biprompt.types import ImageEmbedding, SegmentResult  # noqa: E402

__all__ = ["BiPromptError", "BiPromptPipeline", "ImageEmbedding", "SegmentResult"]
