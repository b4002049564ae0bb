"""What a client keeps of its own from one round to the next: its local factors (a method's
``local`` role, FedSA-LoRA's B), on the client's side only.

The server never reads this store: the in-process engine keeps it beside the run
(``<run folder>/client_state/``, standing in for each client's own disk), a Flower node in a
folder of its own machine (:func:`node_store`). One file per client and round,
``client_<k>/round_<t>.safetensors`` (``<module>/B: (d_out, r)``, float32), so memory does not
grow with the clients (10,000 clients of a round keep 10,000 small files, not a dict).

A client starting round t reads the newest file of a round before t (:meth:`LocalFactors.load`;
none: it has not trained yet, so B starts at zero, as PEFT's). Writing round t's file keeps
that start and removes the older ones, so a round redone after a resume reads exactly what the
interrupted one read, and the resumed run is bitwise the uninterrupted one; a file of a round
after the checkpoint (written before a kill) is ignored and then replaced.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from rblora.aggregation.types import FACTORS, Factors
from rblora.utils.atomic import atomic_file

_ROUND_FILE = re.compile(r"^round_(\d+)\.safetensors$")


class LocalFactors:
    """The local factors ``names`` (e.g. ``("B",)``) of every client under ``folder``."""

    def __init__(self, folder: Path | str, names: tuple[str, ...]):
        self.folder = Path(folder)
        self.names = tuple(names)

    def _rounds(self, client: int) -> dict[int, Path]:
        folder = self.folder / f"client_{int(client)}"
        if not folder.is_dir():
            return {}
        found = {}
        for path in folder.iterdir():
            match = _ROUND_FILE.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def load(self, client: int, before_round: int) -> dict[str, torch.Tensor] | None:
        """Client ``client``'s kept factor per module (``{module: B}``) from the newest round
        before ``before_round``; None when it has none (it has not trained yet). ValueError
        naming a file that does not hold what it should."""
        rounds = self._rounds(client)
        earlier = [t for t in rounds if t < before_round]
        if not earlier:
            return None
        path = rounds[max(earlier)]
        try:
            tensors = load_file(str(path))
        except Exception as err:  # a damaged file: the client's own state, named
            raise ValueError(f"{path}: the client's kept factors do not load ({err})") from None
        out = {}
        for key, value in tensors.items():
            module, _, name = key.rpartition("/")
            if name not in self.names or not module:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
            out[module] = value
        return out

    def save(self, client: int, round_: int, factors: Factors) -> None:
        """Keep client ``client``'s local factors of ``factors`` (its trained adapter of round
        ``round_``: ``{module: (A, B)}``), then remove its files older than the one this round
        started from (see the module doc)."""
        tensors = {
            f"{module}/{name}": pair[FACTORS.index(name)]
            .detach()
            .to("cpu", torch.float32)
            .contiguous()
            for module, pair in sorted(factors.items())
            for name in self.names
        }
        folder = self.folder / f"client_{int(client)}"
        folder.mkdir(parents=True, exist_ok=True)
        earlier = {t: path for t, path in self._rounds(client).items() if t < round_}
        with atomic_file(folder / f"round_{int(round_)}.safetensors") as fh:
            fh.write(save(tensors, metadata={"format": "pt"}))
        keep = max(earlier, default=None)
        for t, path in earlier.items():
            if t != keep:
                path.unlink(missing_ok=True)


def run_store(run_folder: Path, names: tuple[str, ...]) -> LocalFactors | None:
    """The in-process engine's store of the clients' local factors: ``<run>/client_state``;
    None when the method keeps no factor on the clients."""
    return LocalFactors(Path(run_folder) / "client_state", names) if names else None


def node_store(state_dir: str | Path, run_key: str, names: tuple[str, ...]) -> LocalFactors | None:
    """A Flower node's store: ``<state_dir>/<digest of run_key>/`` on the node's own machine
    (``run_key``: what names the run, the same after a resume); None when the method keeps
    no factor on the clients."""
    if not names:
        return None
    digest = hashlib.sha256(run_key.encode()).hexdigest()[:16]
    return LocalFactors(Path(state_dir) / digest, names)
