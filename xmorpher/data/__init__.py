"""Data for registration: built-in brain anatomy, synthetic subjects and shapes, generalization pairs
made by another deformation model, users' NIfTI pairs."""

from .anatomy import BrainTemplate, load_brain_template
from .datasets import (
    GENERALIZATION_BINS_MM,
    BrainPairs,
    GeneralizationPairs,
    NiftiPairs,
    ShapesPairs,
    make_dataset,
    synthesize_brain_subject,
    synthesize_shapes,
)
from .nifti import Volume, load_volume, normalize_intensity, save_volume
from .synth import DeformationParams, FreeFormParams, IntensityParams, random_deformation, random_free_form_deformation

__all__ = [
    "BrainTemplate",
    "load_brain_template",
    "BrainPairs",
    "GeneralizationPairs",
    "GENERALIZATION_BINS_MM",
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
    "FreeFormParams",
    "IntensityParams",
    "random_deformation",
    "random_free_form_deformation",
]
