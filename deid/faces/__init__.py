"""Faces in frames: detection (MTCNN, and over turned views for rolled faces), FFHQ-style alignment, tracking and
smoothing across frames, paste-back."""
