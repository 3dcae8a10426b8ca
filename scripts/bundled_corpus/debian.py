"""Fetching a pinned Debian package (``apt-get download``) and extracting it (``dpkg-deb -x``)."""

from __future__ import annotations

import glob
import os
import subprocess

from .text import BuildError, log


def _deb_field(path: str, field: str) -> str:
    out = subprocess.run(
        ["dpkg-deb", "-f", path, field], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def fetch_deb(package: str, version: str, cache: str) -> str:
    """Return the path of ``package_version_*.deb`` in *cache*, downloading it if needed."""
    fname_version = version.replace(":", "%3a")
    pattern = os.path.join(cache, f"{package}_{fname_version}_*.deb")
    found = sorted(glob.glob(pattern))
    if not found:
        log(f"  apt-get download {package}={version}")
        proc = subprocess.run(
            ["apt-get", "download", f"{package}={version}"],
            cwd=cache,
            capture_output=True,
            text=True,
        )
        found = sorted(glob.glob(pattern))
        if proc.returncode != 0 or not found:
            raise BuildError(
                f"could not download {package}={version}: {proc.stderr.strip()}\n"
                "(run 'apt-get update', or put the .deb in a --cache directory)"
            )
    path = found[0]
    got = (_deb_field(path, "Package"), _deb_field(path, "Version"))
    if got != (package, version):
        raise BuildError(f"{path} is {got[0]} {got[1]}, expected {package} {version}")
    return path


def extract_deb(deb: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return dest
