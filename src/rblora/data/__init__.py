"""Data: prompt templates, data sources, federated partitioners and the prepared-folder readers.

``prepare-data`` (``rblora.data.prepare``) writes ``<root>/<K>/``; the training loop reads it back
with :func:`load_federated_split` (text) or :func:`load_federated_images` (images).
"""

from rblora.data.federated import (
    FederatedData,
    FederatedImages,
    ImageSplit,
    load_client_images,
    load_federated_images,
    load_federated_split,
    load_test_images,
)

__all__ = [
    "FederatedData",
    "FederatedImages",
    "ImageSplit",
    "load_client_images",
    "load_federated_images",
    "load_federated_split",
    "load_test_images",
]
