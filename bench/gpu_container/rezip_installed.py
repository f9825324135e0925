#!/usr/bin/env python3
"""Re-pack installed Python distributions back into wheels, for an offline wheelhouse.

    python3 rezip_installed.py 'torch==2.11.0+cu130' torchvision==0.26.0+cu130 \
        transformers==5.17.0 accelerate==1.15.0 --have /work/carry/wheels --out /tmp/wheelhouse

Why this exists: a machine with no network has packages installed (torch+cu130, the nvidia-*
wheels, transformers ...) that an offline install elsewhere on it (a Docker build with a
wheelhouse, a fresh venv) needs as wheel files, and the original wheels are gone. No maintained
tool turns an *installed* distribution back into a wheel:
  * `pip wheel NAME` resolves and builds from an sdist / source tree or downloads the wheel; it
    never reads site-packages (and offline it finds nothing).
  * `pip download` needs an index.
  * `wheel pack DIR` (the `wheel` package) only re-zips an *unpacked wheel* directory (it needs
    the purelib/platlib root laid out as in the wheel, with `.data/` dirs, and one
    `.dist-info`); site-packages mixes every distribution, so the files must first be picked
    out by RECORD, which it does not do.
  * `wheel unpack` and `installer` go the other way (wheel -> installed files);
    `pipdeptree` only walks the dependency graph.
So this script does it with the stdlib and `packaging`: it walks the requirement closure
through importlib.metadata of the running interpreter, and for each distribution zips exactly
the files its RECORD lists (ZIP_STORED, for speed: torch/nvidia libraries are GBs and barely
compress), with a fresh RECORD (sha256, sizes) and the distribution's own WHEEL file.

Rules:
  * markers are evaluated for the running interpreter; extras only when requested
    (`pkg[extra]` in a requirement string);
  * a name that a wheel in --have satisfies is not re-zipped, but that wheel's own
    Requires-Dist are still followed;
  * RECORD entries outside site-packages (`../../../bin/torchrun`) go to
    `<dist-info stem>.data/scripts/` when they are in a bin/ directory (a python shebang is
    rewritten to `#!python`, as the wheel spec asks, so the installer points it at its own
    interpreter), except console/gui entry-point wrappers (`../../../bin/pip3`, `typer`):
    installers generate those from entry_points.txt, pip silently skips a copy in
    .data/scripts but `installer` (python -m installer) fails with "File already exists";
    any other outside entry (e.g. ../../../share/man/...) is dropped with a warning;
  * `__pycache__/` and *.pyc, and the installer's INSTALLER, REQUESTED, direct_url.json and
    RECORD are not copied; files RECORD lists but that are missing are skipped with a warning;
  * editable installs and distributions without RECORD (egg-info) are skipped with a warning.

Exit status: 0, or 1 if a required distribution was neither installed nor in --have
(the wheels that could be made are still written).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as im
import io
import json
import os
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

CHUNK = 1 << 20
INSTALLER_FILES = {
    "INSTALLER",
    "REQUESTED",
    "direct_url.json",
    "RECORD",
    "RECORD.jws",
    "RECORD.p7s",
}


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def b64_digest(h: hashlib._Hash) -> str:
    return "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


# ---------------------------------------------------------------- what is where


def installed_index() -> dict[str, im.Distribution]:
    """Canonical name -> the distribution import would use (first on sys.path)."""
    index: dict[str, im.Distribution] = {}
    for dist in im.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        index.setdefault(canonicalize_name(name), dist)
    return index


def have_index(dirs: list[str]) -> dict[str, list[tuple[Version | None, Path]]]:
    """Canonical name -> [(version, wheel path)] for the wheels in the --have dirs."""
    index: dict[str, list[tuple[Version | None, Path]]] = {}
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            warn(f"--have {d}: not a directory")
            continue
        for whl in sorted(p.glob("*.whl")):
            parts = whl.name[:-4].split("-")
            if len(parts) not in (5, 6):
                warn(f"--have: not a wheel filename: {whl.name}")
                continue
            try:
                ver: Version | None = Version(parts[1])
            except InvalidVersion:
                ver = None
            index.setdefault(canonicalize_name(parts[0]), []).append((ver, whl))
    return index


def wheel_requires(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as zf:
        for n in zf.namelist():
            top, _, rest = n.partition("/")
            if top.endswith(".dist-info") and rest == "METADATA":
                meta = zf.read(n).decode("utf-8", "replace")
                break
        else:
            warn(f"{whl.name}: no METADATA, its dependencies are not followed")
            return []
    from email.parser import HeaderParser

    return HeaderParser().parsestr(meta).get_all("Requires-Dist") or []


def wanted(req: Requirement, extras: set[str], env: dict[str, str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras | {""}))


# ---------------------------------------------------------------- the closure


def closure(reqs: list[str], installed, have, exclude: set[str]):
    """Walk the requirement graph. Returns (to_zip: {name: (dist, extras)}, from_have, missing)."""
    env = default_environment()
    queue: list[tuple[Requirement, str]] = []
    for r in reqs:
        try:
            queue.append((Requirement(r), "command line"))
        except InvalidRequirement as exc:
            sys.exit(f"bad requirement {r!r}: {exc}")
    seen_extras: dict[str, set[str]] = {}
    to_zip: dict[str, tuple[im.Distribution, set[str]]] = {}
    from_have: dict[str, Path] = {}
    missing: list[str] = []
    while queue:
        req, why = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in exclude:
            continue
        extras = {canonicalize_name(e) for e in req.extras}
        first = name not in seen_extras
        new_extras = extras - seen_extras.get(name, set())
        if not first and not new_extras:
            continue
        seen_extras.setdefault(name, set()).update(extras)
        all_extras = seen_extras[name]

        # A wheel in --have that satisfies the requirement: not re-zipped, its deps followed.
        hit = None
        for ver, whl in have.get(name, []):
            if ver is None or not req.specifier or req.specifier.contains(ver, prereleases=True):
                hit = whl
                break
        if hit is None and have.get(name) and first:
            warn(f"{req} ({why}): --have has {[w.name for _, w in have[name]]}, none satisfies it")
        if hit is not None:
            from_have[name] = hit
            deps = wheel_requires(hit)
        else:
            dist = installed.get(name)
            if dist is None:
                if first:
                    missing.append(f"{req} (required by {why})")
                continue
            ver = dist.version
            try:
                if req.specifier and not req.specifier.contains(Version(ver), prereleases=True):
                    warn(f"{req} ({why}): installed is {ver}; re-zipping that")
            except InvalidVersion:
                warn(f"{name}: installed version {ver!r} is not PEP 440")
            to_zip[name] = (dist, all_extras)
            deps = dist.requires or []
        label = f"{name}[{','.join(sorted(all_extras))}]" if all_extras else name
        for d in deps:
            try:
                dr = Requirement(d)
            except InvalidRequirement:
                warn(f"{name}: unparsable Requires-Dist {d!r}, ignored")
                continue
            if wanted(dr, all_extras if first else new_extras, env):
                # marker without extra evaluated for the running env
                queue.append((dr, label))
    return to_zip, from_have, missing


# ---------------------------------------------------------------- writing one wheel


def compressed_tag(tags: list[str]) -> str:
    py, abi, plat = [], [], []
    for t in tags:
        a, b, c = t.split("-")
        for lst, v in ((py, a), (abi, b), (plat, c)):
            for x in v.split("."):
                if x not in lst:
                    lst.append(x)
    return f"{'.'.join(py)}-{'.'.join(abi)}-{'.'.join(plat)}"


def fix_shebang(data: bytes) -> bytes:
    """A python shebang becomes `#!python` (wheel spec: the installer rewrites it)."""
    if not data.startswith(b"#!"):
        return data
    lines = data.split(b"\n")
    # pip/distlib's long-path form:  #!/bin/sh  /  '''exec' "/path/python" "$0" "$@"  /  ' '''
    if lines[0].strip() == b"#!/bin/sh" and len(lines) > 2 and lines[1].startswith(b"'''exec'"):
        if b"python" in lines[1] and lines[2].strip() == b"' '''":
            return b"\n".join([b"#!python", *lines[3:]])
        return data
    if b"python" in lines[0]:
        return b"\n".join([b"#!python", *lines[1:]])
    return data


class WheelWriter:
    def __init__(self, path: Path):
        self.zf = zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, strict_timestamps=False)
        self.record: list[tuple[str, str, str]] = []

    def add_file(self, src: Path, arcname: str) -> int:
        zi = zipfile.ZipInfo.from_file(src, arcname, strict_timestamps=False)
        zi.compress_type = zipfile.ZIP_STORED
        h = hashlib.sha256()
        n = 0
        with (
            open(src, "rb") as f,
            self.zf.open(zi, "w", force_zip64=zi.file_size > 0x7FFF0000) as out,
        ):
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        self.record.append((arcname, b64_digest(h), str(n)))
        return n

    def add_bytes(self, data: bytes, arcname: str, mode: int = 0o644) -> int:
        zi = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
        zi.external_attr = (0o100000 | mode) << 16
        zi.compress_type = zipfile.ZIP_STORED
        self.zf.writestr(zi, data)
        self.record.append((arcname, b64_digest(hashlib.sha256(data)), str(len(data))))
        return len(data)

    def close(self, record_arcname: str) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in self.record:
            w.writerow(row)
        w.writerow((record_arcname, "", ""))
        zi = zipfile.ZipInfo(record_arcname, date_time=(1980, 1, 1, 0, 0, 0))
        zi.external_attr = (0o100644) << 16
        self.zf.writestr(zi, buf.getvalue().encode())
        self.zf.close()


def on_disk(name: str, files: list[tuple[Path, str]]) -> Iterator[tuple[Path, str]]:
    """The (source, archive name) pairs of `files` whose source is still there: RECORD can
    outlive a file deleted by hand, and one missing file should not cost the whole wheel."""
    for src, arc in files:
        if src.is_file():
            yield src, arc
        else:
            warn(f"{name}: {arc} listed in RECORD is missing; skipped")


def rezip(dist: im.Distribution, out_dir: Path) -> tuple[Path, int, int, list[str]] | None:
    name = dist.metadata["Name"]
    ver_s = dist.version
    record_text = dist.read_text("RECORD")
    info = getattr(dist, "_path", None)  # the .dist-info directory (PathDistribution)
    if record_text is None or info is None or not str(info).endswith(".dist-info"):
        warn(f"{name} {ver_s}: no .dist-info/RECORD (egg-info or unusual install); skipped")
        return None
    info = Path(info)
    durl = dist.read_text("direct_url.json")
    if durl:
        try:
            if json.loads(durl).get("dir_info", {}).get("editable"):
                warn(f"{name} {ver_s}: an editable install; skipped")
                return None
        except ValueError:
            pass
    base = info.parent  # site-packages (purelib or platlib) holding this distribution
    info_name = info.name
    data_dir = info_name[: -len(".dist-info")] + ".data"

    wheel_txt = dist.read_text("WHEEL")
    had_wheel = bool(wheel_txt)
    if wheel_txt:
        tags = [
            ln.split(":", 1)[1].strip() for ln in wheel_txt.splitlines() if ln.startswith("Tag:")
        ]
        if not tags:
            warn(f"{name}: WHEEL has no Tag line; py3-none-any")
            tags = ["py3-none-any"]
    else:
        tags = ["py3-none-any"]
        wheel_txt = (
            "Wheel-Version: 1.0\nGenerator: rezip_installed\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        )
    try:
        ver_norm = str(Version(ver_s))
    except InvalidVersion:
        ver_norm = ver_s.replace("-", "_")
    fname = f"{canonicalize_name(name).replace('-', '_')}-{ver_norm}-{compressed_tag(tags)}.whl"
    target = out_dir / fname

    main: list[tuple[Path, str]] = []
    scripts: list[tuple[Path, str]] = []
    distinfo: list[tuple[Path, str]] = []
    scripts_dir = Path(sysconfig.get_path("scripts")).resolve()
    # Console/GUI entry-point wrappers are not copied: every installer writes them anew from
    # entry_points.txt (pip skips such files in .data/scripts, `installer` fails on the clash).
    ep_names = {e.name for e in dist.entry_points if e.group in ("console_scripts", "gui_scripts")}
    regenerated: list[str] = []
    rows = list(csv.reader(io.StringIO(record_text)))
    has_native = False
    for row in rows:
        if not row or not row[0]:
            continue
        rel = row[0]
        parts = rel.replace("\\", "/").split("/")
        if "__pycache__" in parts or rel.endswith((".pyc", ".pyo")):
            continue
        if os.path.isabs(rel) or parts[0] == "..":
            src = Path(os.path.normpath(base / rel))
            if src.parent.name == "bin" or src.parent == scripts_dir:
                stem = src.name.removesuffix(".exe").removesuffix("-script.py")
                if stem in ep_names:
                    regenerated.append(src.name)
                    continue
                scripts.append((src, f"{data_dir}/scripts/{src.name}"))
            else:
                warn(f"{name}: {rel} is outside site-packages and not in a bin/; dropped")
            continue
        if parts[0] == info_name:
            # The installer's own files are not the wheel's; WHEEL is written anew from wheel_txt.
            if len(parts) == 2 and (parts[1] in INSTALLER_FILES or parts[1] == "WHEEL"):
                continue
            distinfo.append((base / rel, "/".join(parts)))
            continue
        if rel.endswith((".so", ".pyd")) or ".so." in rel:
            has_native = True
        main.append((base / rel, "/".join(parts)))
    if has_native and not had_wheel:
        warn(f"{name}: has native code but no WHEEL tag; wheel tagged py3-none-any")

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    w = WheelWriter(tmp)
    size = 0
    nfiles = 0
    try:
        for src, arc in on_disk(name, main):
            size += w.add_file(src, arc)
            nfiles += 1
        for src, arc in scripts:
            if not src.is_file():
                warn(f"{name}: script {src} listed in RECORD is missing; skipped")
                continue
            data = src.read_bytes()
            size += w.add_bytes(fix_shebang(data), arc, mode=0o755)
            nfiles += 1
        for src, arc in on_disk(name, distinfo):  # .dist-info last, as the wheel spec recommends
            size += w.add_file(src, arc)
            nfiles += 1
        size += w.add_bytes(wheel_txt.encode(), f"{info_name}/WHEEL")
        nfiles += 1
        w.close(f"{info_name}/RECORD")
    except BaseException:
        w.zf.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target, size, nfiles, regenerated


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Re-pack installed distributions (a requirement closure) into wheels.",
    )
    ap.add_argument("requirements", nargs="+", help="requirement strings, e.g. torch==2.11.0+cu130")
    ap.add_argument("--out", required=True, help="directory to write the wheels into")
    ap.add_argument(
        "--have",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of wheels already there (repeatable): names they satisfy are not re-zipped",
    )
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="distribution not to re-zip nor follow (repeatable)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the closure, write nothing")
    a = ap.parse_args(argv)

    installed = installed_index()
    have = have_index(a.have)
    exclude = {canonicalize_name(x) for x in a.exclude}
    to_zip, from_have, missing = closure(a.requirements, installed, have, exclude)

    for name, whl in sorted(from_have.items()):
        print(f"have     {name:32s} {whl.name}")
    out = Path(a.out)
    total = 0
    count = 0
    for name, (dist, _extras) in sorted(to_zip.items()):
        if a.dry_run:
            print(f"would    {name:32s} {dist.version}")
            continue
        res = rezip(dist, out)
        if res is None:
            continue
        path, _size, nfiles, regenerated = res
        wsize = path.stat().st_size
        total += wsize
        count += 1
        extra = (
            f"  (entry-point scripts left to the installer: {' '.join(regenerated)})"
            if regenerated
            else ""
        )
        print(f"wrote    {path.name}  {wsize / 1e6:.1f} MB  {nfiles} files{extra}")
    for m in missing:
        print(f"MISSING  {m}", file=sys.stderr)
    if not a.dry_run:
        print(
            f"total    {count} wheels, {total / 1e6:.1f} MB in {out}"
            f" ({len(from_have)} satisfied by --have, {len(missing)} missing)"
        )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
