"""Named datasets and the token streams that feed calibration, training and evaluation.

Installed as ``binarize.calibration``.
"""

from .datasets import DATASETS, DatasetDef, data_dir
from .streams import TokenBlocks, TrainStream, load_documents, tokenize_documents

__all__ = ["DATASETS", "DatasetDef", "data_dir", "TokenBlocks", "TrainStream", "load_documents", "tokenize_documents"]
