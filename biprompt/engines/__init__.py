"""One engine per role, each loading only its own weights from the official checkpoints:
the image encoder, the point decoder and the text-mask model. Plain torch: no Ray here. The
serving deployments wrap one engine each; BiPromptPipeline composes all three in one process."""

from biprompt.engines.encoder import ImageEncoderEngine
from biprompt.engines.point_decoder import PointDecoderEngine
from biprompt.engines.text_mask import TextMaskEngine

ENGINES = {"encoder": ImageEncoderEngine, "points": PointDecoderEngine, "text": TextMaskEngine}

__all__ = ["ENGINES", "ImageEncoderEngine", "PointDecoderEngine", "TextMaskEngine"]
