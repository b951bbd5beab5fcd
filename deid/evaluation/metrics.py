"""The paper's metrics, measured with networks that deid never trained with.

identity     cosine similarity of dlib ResNet descriptors (and dlib's own same-person test: distance < 0.6)
expression   mean Euclidean distance of the 68 dlib landmarks, divided by the image (or face box) side
pose         Euclidean norm of the (yaw, pitch, roll) difference in degrees (deid.evaluation.pose, cv2.solvePnP)
RMSE, PSNR   on pixel values in [0, 1]
FID          Frechet distance of pytorch-fid's Inception (TF FID weights) pool features of face crops

Faces are located with deid.faces.detection's MTCNN; dlib places landmarks and describes the face (deid.evaluation.recognizers).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from deid import weights
from deid.checkpoints import read_state_dict
from deid.errors import WeightsError
from deid.evaluation.pose import HeadPose, angle_difference, estimate_pose
from deid.evaluation.recognizers import DLIB_SAME_PERSON_DISTANCE, DlibFaceAnalyzer, FaceMeasurement
from deid.faces.detection import DetectConfig, FaceDetector

# ---------------------------------------------------------------------------------- per-face numbers


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two descriptors [D]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two dlib descriptors [128]; below DLIB_SAME_PERSON_DISTANCE means one person."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def landmark_error(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """Mean Euclidean distance of corresponding landmarks [68, 2] (pixels), divided by `scale` (pixels):
    the image side for aligned crops, the face box side in video."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1).mean() / scale)


def pose_error(a: HeadPose, b: HeadPose) -> float:
    """Euclidean norm of the (yaw, pitch, roll) difference in degrees."""
    return float(np.linalg.norm(angle_difference(a.angles, b.angles)))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square error of two uint8 images [H, W, 3], on values scaled to [0, 1]."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) / 255.0
    return float(np.sqrt(np.mean(diff**2)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (peak 1 on [0, 1]); inf for identical images."""
    error = rmse(a, b)
    return float("inf") if error == 0 else float(20.0 * np.log10(1.0 / error))


def box_side(box: np.ndarray) -> float:
    """The mean side of a box (x0, y0, x1, y1) in pixels."""
    return float(((box[2] - box[0]) + (box[3] - box[1])) / 2)


def square_crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The square around a face box (side = the box's longer side, same centre), resized to size x size.
    image: [H, W, 3] uint8; returns [size, size, 3] uint8 (borders replicated where the square leaves the image)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = size / side
    affine = np.array([[scale, 0, size / 2 - cx * scale], [0, scale, size / 2 - cy * scale]])
    return cv2.warpAffine(np.ascontiguousarray(image), affine, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


# ------------------------------------------------------------------------------------------ faces


@dataclass(frozen=True)
class MeasuredFace:
    """A face with everything the metrics need. `detected` is False when no face was found and the
    measurement was taken at a fallback box (e.g. the input's face box for an output without a detectable face)."""

    face: FaceMeasurement
    pose: HeadPose
    detected: bool

    @property
    def box(self) -> np.ndarray:
        return self.face.box


class FaceMeter:
    """Locates faces (MTCNN, deid.faces.detection) and measures them (dlib landmarks + descriptor, solvePnP pose)."""

    def __init__(self, device: torch.device | str = "cpu", detect: DetectConfig = DetectConfig()):
        self.detector = FaceDetector(detect, device=device)
        self.analyzer = DlibFaceAnalyzer()

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Boxes [K, 4] (x0, y0, x1, y1) of every face in image [H, W, 3] uint8 RGB, largest first."""
        detections = self.detector([np.ascontiguousarray(image)])[0]
        boxes = detections.boxes.astype(np.float64)
        return boxes[np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]

    def measure_at(self, image: np.ndarray, box: np.ndarray, detected: bool = True) -> MeasuredFace:
        face = self.analyzer.measure(image, box)
        height, width = image.shape[:2]
        return MeasuredFace(face, estimate_pose(face.landmarks, width, height), detected)

    def measure(self, image: np.ndarray, fallback_box: np.ndarray | None = None) -> MeasuredFace | None:
        """The largest face of image [H, W, 3] uint8 RGB; at `fallback_box` when none is detected
        (None when there is no fallback either)."""
        boxes = self.detect(image)
        if len(boxes):
            return self.measure_at(image, boxes[0], detected=True)
        if fallback_box is None:
            return None
        return self.measure_at(image, fallback_box, detected=False)


def compare_faces(reference: MeasuredFace, other: MeasuredFace, scale: float) -> dict[str, float]:
    """Identity, expression and pose numbers of `other` against `reference`; `scale` normalises landmarks."""
    distance = descriptor_distance(reference.face.descriptor, other.face.descriptor)
    return {
        "identity": cosine_similarity(reference.face.descriptor, other.face.descriptor),
        "identity_distance": distance,
        "same_person": bool(distance < DLIB_SAME_PERSON_DISTANCE),
        "expression": landmark_error(reference.face.landmarks, other.face.landmarks, scale),
        "pose": pose_error(reference.pose, other.pose),
    }


# -------------------------------------------------------------------------------------------- FID


class FeatureStats:
    """Running mean and covariance of feature vectors, in float64, so FID over any N streams (and resumes)."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """features: [N, dim]."""
        x = np.asarray(features, np.float64).reshape(-1, self.total.shape[0])
        self.count += x.shape[0]
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased sample covariance (as np.cov(x, rowvar=False))."""
        if self.count < 2:
            raise ValueError("a covariance needs at least two samples")
        mean = self.mean
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count), "total": self.total, "outer": self.outer}

    @classmethod
    def from_state(cls, state) -> "FeatureStats":
        stats = cls(state["total"].shape[0])
        stats.count, stats.total, stats.outer = int(state["count"]), np.array(state["total"]), np.array(state["outer"])
        return stats


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance of the Gaussians fitted to two feature sets (pytorch-fid's implementation)."""
    # lazy: pytorch-fid (scipy) is needed only by FID
    from pytorch_fid.fid_score import calculate_frechet_distance

    # the distance is never negative; rounding in the matrix square root can leave about -1e-8 for equal sets
    return max(0.0, float(calculate_frechet_distance(a.mean, a.covariance, b.mean, b.covariance)))


FID_WEIGHTS = "inception-v3-fid"
FID_FEATURES = 2048
FID_CROP = 299  # the Inception input side; crops are cut at it so no second resize happens


def _fid_inception_net(state: dict[str, torch.Tensor] | None, seed: int) -> torch.nn.Module:
    """The TF-FID variant of InceptionV3 (pytorch-fid's blocks), with `state` or seeded random weights."""
    # lazy: pytorch-fid (scipy) is needed only by FID
    from pytorch_fid import inception as pf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pf.FIDInceptionE_1(1280)
        net.Mixed_7c = pf.FIDInceptionE_2(2048)
        if state is None:
            # PyTorch's default init shrinks activations ~10x per block; He init keeps random features
            # at a useful scale, so FID plumbing can be tested without the real weights.
            for module in net.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(
                f"the FID Inception weights do not fit pytorch-fid's network ({str(exc).splitlines()[0][:160]}). "
                f"Fetch the right file: deid weights fetch {FID_WEIGHTS}"
            ) from None
    return net


# pytorch-fid's feature blocks of its InceptionV3 and the feature size at the end of each (its --dims).
FID_BLOCK_BY_DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}


def _fid_blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The four blocks pytorch-fid's InceptionV3 cuts the FID Inception into (its layout, built here from our own
    network: pytorch-fid's class only builds around weights it downloads itself)."""
    pool = lambda: torch.nn.MaxPool2d(kernel_size=3, stride=2)  # noqa: E731
    return [
        torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool()),
        torch.nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool()),
        torch.nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c,
                            net.Mixed_6d, net.Mixed_6e),
        torch.nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(output_size=(1, 1))),
    ]


class FIDInception(torch.nn.Module):
    """pytorch-fid's InceptionV3 feature extractor with weights from deid's weights manager.

    forward: images [N, 3, H, W] float in [0, 1] -> features [N, dims] float32. dims 2048 (the final pool) is
    the standard FID; 64, 192 and 768 (earlier blocks, as pytorch-fid's --dims) are cheaper and not comparable.
    """

    def __init__(self, source: str = FID_WEIGHTS, dims: int = FID_FEATURES, seed: int = 0):
        super().__init__()
        path = weights.resolve(source)  # raises WeightsError naming the fix when the file is missing
        if dims not in FID_BLOCK_BY_DIMS:
            raise ValueError(f"FID features come in {sorted(FID_BLOCK_BY_DIMS)} dimensions, not {dims}")
        self.source, self.dims = str(source), dims
        self.fingerprint = weights.file_sha256(path) if path is not None else f"random-seed-{seed}"
        net = _fid_inception_net(read_state_dict(path) if path is not None else None, seed)
        self.blocks = torch.nn.Sequential(*_fid_blocks(net)[: FID_BLOCK_BY_DIMS[dims] + 1])
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # pytorch-fid's input handling: bilinear resize to 299 (align_corners=False), then [0, 1] -> [-1, 1]
        x = torch.nn.functional.interpolate(images, size=(FID_CROP, FID_CROP), mode="bilinear", align_corners=False)
        features = self.blocks(2 * x - 1)
        # earlier blocks give feature maps: average them spatially, as pytorch-fid does for its smaller --dims
        return torch.nn.functional.adaptive_avg_pool2d(features, 1).flatten(1).float()

    def features(self, crops: np.ndarray) -> np.ndarray:
        """crops: [N, S, S, 3] uint8 RGB -> [N, dims] float32 numpy."""
        device = next(self.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        return self(x).cpu().numpy()
