"""URA-Net's building blocks: the frozen feature extractor, feature anomaly synthesis (FASM), the uncertainty
perception module (UIAPM), the restoration attention (RAM), the Bayesian convolution and the anomaly map."""

from .anomaly_map import AnomalyMapGenerator, feature_residual, image_score
from .bayesian import BayesianConv2d
from .fasm import FeatureAnomalySynthesis, sample_region_masks
from .feature_extractor import BACKBONE_LEVELS, PretrainedFeatureExtractor
from .ram import RestorationAttention, RestorationOutput
from .uiapm import PerceptionEnsemble, PerceptionOutput, UncertaintyAnomalyPerception, perception_heads

__all__ = [
    "AnomalyMapGenerator",
    "BACKBONE_LEVELS",
    "BayesianConv2d",
    "FeatureAnomalySynthesis",
    "PerceptionEnsemble",
    "PerceptionOutput",
    "PretrainedFeatureExtractor",
    "RestorationAttention",
    "RestorationOutput",
    "UncertaintyAnomalyPerception",
    "feature_residual",
    "image_score",
    "perception_heads",
    "sample_region_masks",
]
