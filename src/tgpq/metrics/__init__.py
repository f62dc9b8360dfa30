"""Quality metrics for diffusion samples, all computable offline.

Always available (assets ship with tgpq):
  - ``feature_frechet_distance(images)``: Frechet distance in the feature space of the shipped
    CIFAR-10 classifier against the CIFAR-10 train-set statistics;
  - ``classifier_precision_recall(images, reference_images)``: k-NN manifold precision/recall
    (Kynkaanniemi et al. 2019, k=3) in that feature space;
  - ``psnr`` / ``ssim``: full-reference image metrics (e.g. quantized vs full-precision samples
    from the same seeds).
With a local FID-Inception weights file (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``):
  - ``inception_fid`` and ``inception_score``.
Images are uint8 NHWC ``[N, 32, 32, 3]`` or float NCHW ``[N, 3, H, W]`` in [-1, 1].
"""
from .classifier import CifarResNet, classifier_features, classifier_logits, load_classifier
from .feature_distance import classifier_precision_recall, feature_frechet_distance, load_train_feature_stats
from .frechet import feature_stats, frechet_distance
from .image import psnr, ssim
from .inception import (FIDInceptionV3, inception_fid, inception_outputs, inception_score,
                        inception_score_from_logits, load_fid_inception)
from .precision_recall import knn_radii, manifold_coverage, precision_recall

__all__ = [
    "CifarResNet", "load_classifier", "classifier_features", "classifier_logits",
    "feature_stats", "frechet_distance", "load_train_feature_stats", "feature_frechet_distance",
    "precision_recall", "knn_radii", "manifold_coverage", "classifier_precision_recall",
    "psnr", "ssim",
    "FIDInceptionV3", "load_fid_inception", "inception_outputs", "inception_fid", "inception_score",
    "inception_score_from_logits",
]
