"""Model construction and checkpoint loading (SAM from segment-anything, BEiT-3 from torchscale)."""
