"""Errors a user can act on. The CLI prints their message alone (one line) and exits 1."""


class DeidError(Exception):
    """An error the user can fix; its message names the problem and the fix."""


class WeightsError(DeidError):
    """A pretrained file is missing, corrupt or of an unsupported format."""


class NoFaceError(DeidError):
    """An image that must hold a face holds none."""


class MediaError(DeidError):
    """An input video or image cannot be read, or an output cannot be written."""


class DatasetError(DeidError):
    """A generated dataset is incomplete, corrupt or does not match the run."""
