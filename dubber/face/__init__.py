"""Faces: dlib detection, 68-point landmarks, tracking over time, and RSA-style alignment."""

from dubber.face.align import crop_transforms, inverse_affine, mouth_points, warp_crop
from dubber.face.track import FaceTrack, track_faces

__all__ = ["FaceTrack", "track_faces", "crop_transforms", "warp_crop", "inverse_affine", "mouth_points"]
