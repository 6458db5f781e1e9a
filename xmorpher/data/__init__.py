"""Data for registration: built-in brain anatomy, synthetic subjects and shapes, users' NIfTI pairs."""

from .anatomy import BrainTemplate, load_brain_template
from .datasets import BrainPairs, NiftiPairs, ShapesPairs, make_dataset, synthesize_brain_subject, synthesize_shapes
from .nifti import Volume, load_volume, normalize_intensity, save_volume
from .synth import DeformationParams, IntensityParams, random_deformation

__all__ = [
    "BrainTemplate",
    "load_brain_template",
    "BrainPairs",
    "ShapesPairs",
    "NiftiPairs",
    "make_dataset",
    "synthesize_brain_subject",
    "synthesize_shapes",
    "Volume",
    "load_volume",
    "normalize_intensity",
    "save_volume",
    "DeformationParams",
    "IntensityParams",
    "random_deformation",
]
