"""Train-time loading: shards -> DALI (or webdataset + torch workers) -> one batch contract handed to torch."""
from .batch import Batch
from .config import LoaderConfig
from .dataset import DatasetInfo, load_dataset_info
from .loader import make_loader

__all__ = ["Batch", "DatasetInfo", "LoaderConfig", "load_dataset_info", "make_loader"]
