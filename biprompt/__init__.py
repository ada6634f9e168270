"""BiPrompt-SAM core: models, preprocessing, selection, codecs and the in-process pipeline.

Plain torch/numpy; this package never imports ray.
"""

from biprompt import _compat

_compat.install()
