"""Data: prompt templates, data sources, federated partitioners and the prepared-folder readers.

``prepare-data`` (``rblora.data.prepare``) writes ``<root>/<K>/``; the training loop reads it back
with :func:`load_federated_split` (text) or :func:`load_federated_images` (images); a Flower node
reads its own client alone (:func:`load_client_records`, :func:`load_client_images`) and a Flower
server the metadata and the test set alone (:func:`read_partition`, :func:`load_test_records`,
:func:`load_test_images`).
"""

from rblora.data.federated import (
    ClientImages,
    FederatedData,
    FederatedImages,
    ImageSplit,
    load_client_images,
    load_client_records,
    load_federated_images,
    load_federated_split,
    load_local_test_records,
    load_test_images,
    load_test_records,
    open_client_images,
    read_partition,
)

__all__ = [
    "ClientImages",
    "FederatedData",
    "FederatedImages",
    "ImageSplit",
    "load_client_images",
    "load_client_records",
    "load_federated_images",
    "load_federated_split",
    "load_test_images",
    "load_local_test_records",
    "load_test_records",
    "open_client_images",
    "read_partition",
]
