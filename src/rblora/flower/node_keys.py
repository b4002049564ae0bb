"""``--node_keys FILE``: bind each partition to the public key its SuperNode authenticates with.

With SuperNode authentication (``flower-superlink --enable-supernode-auth``, each node
registered with ``flwr supernode register <key>.pub``), the SuperLink knows which public key
every connected node holds and the ServerApp can read it (``Grid.get_nodes()``: ``NodeInfo``
with ``public_key``, PEM). The server's file says which key each partition's node must hold::

    {"0": "keys/node0.pub", "1": "keys/node1.pub", "2": "keys/node2.pub"}

(paths relative to the file; the OpenSSH ``.pub`` files given to ``flwr supernode register``, or
PEM; a node serving several partitions has its key bound to each). A node that claims a
partition is then taken only if it holds that partition's key, so a node claiming another's
partition is refused alone and cannot lock the honest one out.
Without the file a doubly claimed partition is refused for both nodes (neither can be told from
the other).
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization


def spki(data: bytes) -> bytes:
    """A public key (OpenSSH ``.pub`` line or PEM) as DER SubjectPublicKeyInfo bytes, the one
    form two encodings of a key are compared in; ValueError if ``data`` is neither."""
    data = data.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"not an OpenSSH or PEM public key ({err})") from None
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_node_keys(path: str | Path, num_clients: int) -> dict[int, bytes]:
    """Partition -> the DER public key its node must hold, from the JSON file ``path``.
    ValueError (one line naming the file and the bad entry) for an unreadable file, a key that
    is not a partition id 0..num_clients-1, and a key file that is missing or not a public key
    (one key may be bound to several partitions: a node that serves them all)."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--node_keys {path}: cannot read it as JSON ({err})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(
            f'--node_keys {path}: expected a JSON object {{"<partition-id>": "<key file>", ...}}'
        )
    keys: dict[int, bytes] = {}
    for name, file in mapping.items():
        if not str(name).isdigit() or not 0 <= int(name) < num_clients:
            raise ValueError(
                f"--node_keys {path}: {name!r} is not a partition id 0..{num_clients - 1}"
            )
        key_path = path.parent / str(file)
        try:
            keys[int(name)] = spki(key_path.read_bytes())
        except (OSError, ValueError) as err:
            raise ValueError(f"--node_keys {path}: partition {name}: {key_path}: {err}") from None
    return keys


def node_public_keys(grid, nodes: list[int]) -> dict[int, bytes | None]:
    """Node id -> the DER public key the SuperLink authenticated it with (None: the node has
    none, e.g. SuperNode authentication is off, or it could not be read)."""
    wanted = set(nodes)
    out: dict[int, bytes | None] = {n: None for n in nodes}
    for info in grid.get_nodes():
        if info.node_id in wanted and info.public_key:
            try:
                out[info.node_id] = spki(bytes(info.public_key))
            except ValueError:
                out[info.node_id] = None
    return out
