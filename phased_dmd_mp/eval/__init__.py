"""Evaluation: diversity and fidelity metrics, pluggable feature extractors, tables and grids.

`python -m phased_dmd_mp.evaluate` runs it on sample files (format: eval/samples.py).
"""

from phased_dmd_mp.eval.digits import DigitsExtractor, load_digits_images
from phased_dmd_mp.eval.extractors import (
    EXTRACTORS,
    FeatureExtractor,
    PerceptualDistance,
    PointFeatures,
    resolve,
)
from phased_dmd_mp.eval.metrics import (
    cosine_diversity,
    frechet_distance,
    frechet_distance_from_statistics,
    mean_confidence_interval,
    perceptual_diversity,
    precision_recall,
)
from phased_dmd_mp.eval.mixture import Mixture, mode_statistics
from phased_dmd_mp.eval.samples import SampleFile, SampleFileError, load_sample_file

__all__ = [
    "EXTRACTORS",
    "DigitsExtractor",
    "FeatureExtractor",
    "Mixture",
    "PerceptualDistance",
    "PointFeatures",
    "SampleFile",
    "SampleFileError",
    "cosine_diversity",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "load_digits_images",
    "load_sample_file",
    "mean_confidence_interval",
    "mode_statistics",
    "perceptual_diversity",
    "precision_recall",
    "resolve",
]
