"""Synthetic data for training and scoring: ShapesRef (see `biprompt.data.shapes_ref`)."""
