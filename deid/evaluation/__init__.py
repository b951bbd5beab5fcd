"""Networks deid never trains with, for measuring its output: dlib's recogniser and landmarks, head pose,
per-face metrics and FID, and the privacy audit of outputs."""
