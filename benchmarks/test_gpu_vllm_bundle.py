"""benchmarks/gpu_vllm_install.sh, the device side of the vLLM bundle, on a small bundle of the same make (a wheel in
a tar, xz, split in two parts): a part alone says what is still to carry, the last one installs and records it,
a second run does nothing, a bundle whose bytes do not match its checksum installs nothing."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "benchmarks" / "gpu_vllm_install.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash and sha256sum")


def wheel_bytes(name: str = "tspin_fake_pkg", version: str = "0.1") -> bytes:
    """A minimal valid wheel of one module."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n".encode(),
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{dist}/RECORD", record)
    return buf.getvalue()


def make_parts(root: Path, *, corrupt: bool = False) -> list[Path]:
    """The layout gpu_vllm_wheels.sh writes: part1/, part2/, each with its piece, bundle.sha256, bundle.parts."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        data = wheel_bytes()
        info = tarfile.TarInfo("wheels/tspin_fake_pkg-0.1-py3-none-any.whl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    bundle = lzma.compress(tar_buf.getvalue())
    digest = hashlib.sha256(bundle).hexdigest()
    if corrupt:
        bundle = bundle[:-1] + bytes([bundle[-1] ^ 1])
    half = len(bundle) // 2
    parts = []
    for k, piece in enumerate((bundle[:half], bundle[half:])):
        d = root / f"part{k + 1}"
        d.mkdir(parents=True)
        (d / f"bundle.tar.xz.{k:02d}").write_bytes(piece)
        (d / "bundle.sha256").write_text(f"{digest}  bundle.tar.xz\n")
        (d / "bundle.parts").write_text("2\n")
        parts.append(d)
    return parts


def install(tmp: Path, *parts: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "VLLM_BUNDLE_DIR": str(tmp / "bundle"),
           "VLLM_SITE": str(tmp / "site"), "VLLM_INSTALL_CHECK": "none"}
    return subprocess.run(["bash", str(INSTALL), *map(str, parts)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_parts_are_gathered_then_installed_once(tmp_path):
    part1, part2 = make_parts(tmp_path / "src")
    first = install(tmp_path, part1)
    assert first.returncode == 0, first.stderr
    assert "have 1 of 2 parts" in first.stdout and "part2" in first.stdout
    assert not (tmp_path / "site").exists()
    second = install(tmp_path, part2)
    assert second.returncode == 0, second.stdout + second.stderr
    site = tmp_path / "site"
    assert (site / ".installed").read_text() == (part1 / "bundle.sha256").read_text()
    out = subprocess.run([sys.executable, "-c", "import tspin_fake_pkg; print(tspin_fake_pkg.VERSION)"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.strip() == "0.1"
    assert not list((tmp_path / "bundle").glob("bundle.tar.xz*"))  # the pieces are gone: /tmp stays small
    again = install(tmp_path, part2)
    assert again.returncode == 0 and "already installed" in again.stdout


def test_a_bundle_that_does_not_match_its_checksum_installs_nothing(tmp_path):
    part1, part2 = make_parts(tmp_path / "src", corrupt=True)
    assert install(tmp_path, part1).returncode == 0
    bad = install(tmp_path, part2)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr
    assert not (tmp_path / "site" / ".installed").exists()


def test_a_directory_that_is_not_a_part_is_refused(tmp_path):
    (tmp_path / "nothing").mkdir()
    proc = install(tmp_path, tmp_path / "nothing")
    assert proc.returncode == 2 and "no bundle.sha256" in proc.stderr
