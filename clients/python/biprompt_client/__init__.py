"""Light Python client for biprompt-serve (installs without torch, ray or pycocotools)."""
