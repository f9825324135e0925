#!/usr/bin/env python3
"""Give a re-made wheel the local version label of the build it is: `relabel_wheel.py WHEEL
cu130` turns torch-2.11.0-....whl into torch-2.11.0+cu130-....whl (dist-info directory,
METADATA's Version, RECORD), and removes the unlabelled one.

Why: the lent H200's torch is PyTorch's cu130 build but its metadata says plain "2.11.0", while
the team image pins `torch==2.11.0+cu130` (versions.ImageSpec.pins: so pip can only install the
flavour's build). A STAND-IN step of the GPU harness only; no wheel tool re-labels a version.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path


def relabel(wheel: Path, label: str) -> Path:
    name, version, rest = wheel.name.split("-", 2)
    new_version = f"{version}+{label}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = wheel.with_name(f"{name}-{new_version}-{rest}")
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            if item.filename == f"{old_info}RECORD":
                continue
            arcname = item.filename.replace(old_info, new_info, 1)
            data = src.read(item)
            if arcname == f"{new_info}METADATA":
                data = data.replace(f"\nVersion: {version}\n".encode(),
                                    f"\nVersion: {new_version}\n".encode(), 1)
            info = zipfile.ZipInfo(arcname, item.date_time)
            info.external_attr = item.external_attr
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{arcname},sha256={digest.decode()},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        dst.writestr(f"{new_info}RECORD", "\n".join(records) + "\n")
    wheel.unlink()
    return target


if __name__ == "__main__":
    print(relabel(Path(sys.argv[1]), sys.argv[2]))
