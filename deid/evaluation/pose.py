"""Head pose (yaw, pitch, roll) from 68-point landmarks, by fitting a generic 3D face with cv2.solvePnP.

Frames: the model lives in camera-aligned coordinates (x to the image's right, y down, z away from the
camera), so a face looking straight into the camera has rotation identity and angles (0, 0, 0). The
rotation model -> camera is R = Rz(roll) @ Ry(yaw) @ Rx(pitch): yaw turns the head about the vertical
axis, pitch nods it, roll tilts it in the image plane. All angles are degrees.

The 3D model is the common six-point generic face (nose tip, chin, outer eye corners, mouth corners; in
millimetre-like units). Six points on a rigid average head make the estimate robust to expression,
which is what a pose metric wants: it must not move when only the mouth opens.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Indices into the iBUG 68-point scheme (dlib's and FAN's order), image-left first.
POSE_LANDMARKS = (30, 8, 36, 45, 48, 54)  # nose tip, chin, outer eye corners, mouth corners

# The same six points on a generic head, camera-aligned (x right, y down, z away from the camera).
FACE_MODEL_3D = np.array(
    [
        [0.0, 0.0, 0.0],  # nose tip
        [0.0, 330.0, 65.0],  # chin
        [-225.0, -170.0, 135.0],  # outer corner of the image-left eye
        [225.0, -170.0, 135.0],  # outer corner of the image-right eye
        [-150.0, 150.0, 125.0],  # image-left mouth corner
        [150.0, 150.0, 125.0],  # image-right mouth corner
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class HeadPose:
    """Angles in degrees (see the module docstring for the axes) and the camera-space translation."""

    yaw: float
    pitch: float
    roll: float
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def angles(self) -> np.ndarray:
        """[3] float64: (yaw, pitch, roll) in degrees."""
        return np.array([self.yaw, self.pitch, self.roll], dtype=np.float64)


def camera_matrix(width: int, height: int) -> np.ndarray:
    """[3, 3] pinhole intrinsics for an uncalibrated image: focal length = the longer side, centre = middle."""
    focal = float(max(width, height))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=np.float64)


def euler_to_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """[3, 3] rotation Rz(roll) @ Ry(yaw) @ Rx(pitch), angles in degrees."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_to_euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of `euler_to_rotation`: (yaw, pitch, roll) in degrees, yaw in [-90, 90]."""
    r = np.asarray(rotation, dtype=np.float64)
    yaw = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    if abs(np.cos(yaw)) > 1e-6:
        pitch = np.arctan2(r[2, 1], r[2, 2])
        roll = np.arctan2(r[1, 0], r[0, 0])
    else:  # gimbal lock (head turned 90 degrees): roll and pitch share one axis, put it all in pitch
        pitch = np.arctan2(-r[1, 2], r[1, 1])
        roll = 0.0
    return tuple(float(v) for v in np.degrees([yaw, pitch, roll]))


def project_model(pose: HeadPose, width: int, height: int) -> np.ndarray:
    """The 3D model's six points seen by `camera_matrix(width, height)` at `pose`: [6, 2] pixels.
    The inverse of `estimate_pose` (used to test it)."""
    rvec, _ = cv2.Rodrigues(euler_to_rotation(pose.yaw, pose.pitch, pose.roll))
    points, _ = cv2.projectPoints(
        FACE_MODEL_3D, rvec, np.asarray(pose.translation, dtype=np.float64), camera_matrix(width, height), None
    )
    return points.reshape(-1, 2)


def estimate_pose(landmarks: np.ndarray, width: int, height: int) -> HeadPose:
    """Head pose from landmarks in pixels: [68, 2] (iBUG order) or the six POSE_LANDMARKS points [6, 2],
    in an image of `width` x `height` pixels."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (68, 2):
        points = points[list(POSE_LANDMARKS)]
    if points.shape != (6, 2):
        raise ValueError(f"expected [68, 2] or [6, 2] landmarks, got {points.shape}")
    camera = camera_matrix(width, height)
    # EPnP gives a closed-form start; Levenberg-Marquardt refines it (the iterative solver alone can
    # land in the mirrored solution behind the camera for near-planar point sets).
    ok, rvec, tvec = cv2.solvePnP(FACE_MODEL_3D, points, camera, None, flags=cv2.SOLVEPNP_EPNP)
    if not ok:
        ok, rvec, tvec = cv2.solvePnP(FACE_MODEL_3D, points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    rvec, tvec = cv2.solvePnPRefineLM(FACE_MODEL_3D, points, camera, None, rvec, tvec)
    rotation, _ = cv2.Rodrigues(rvec)
    yaw, pitch, roll = rotation_to_euler(rotation)
    return HeadPose(yaw, pitch, roll, tuple(float(v) for v in tvec.ravel()))


def angle_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed per-angle difference a - b in degrees, wrapped into [-180, 180)."""
    return (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) + 180.0) % 360.0 - 180.0
