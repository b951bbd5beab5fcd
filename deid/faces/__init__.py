"""Faces in frames: detection (MTCNN), FFHQ-style alignment, tracking and smoothing across frames, paste-back."""
