"""The one table of versions the team image is built from, and the rules that keep it whole.

The defaults were installed together and measured: torch 2.11.0 (cu130), diffusers 0.40.0,
transformers 5.17.0, torchao 0.17.0 and accelerate 1.15.0 generated SD3.5 in bf16 and in both FP8
modes, compiled, on an H200 (bench/results/fp8-h200). An inventory may override any entry in its
`[image]` table; `resolve_image` refuses, before anything is rendered or built, an override that
breaks one of the rules below, naming the key and the reason, so a bad pin fails in `provision`
and not twenty minutes into an image build or at the first FP8 matmul.

The image also follows the host: given its NVIDIA driver, the torch CUDA flavour and the CUDA
base image are the newest that driver can run (`resolve_image(table, driver)`), and an `[image]`
override it cannot run is refused naming the driver it needs. Without a driver (no host, or no
GPU there) the defaults stand: cu130 wheels on a CUDA 13.0 base, which need driver 580.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from provision import safe
from provision.errors import InventoryError

PYTORCH_INDEX = "https://download.pytorch.org/whl"
PYPI_INDEX = "https://pypi.org/simple"
# The torch that has float8 dtypes (FP8 weights), and the one with rowwise-scaled _scaled_mm
# (--fp8 dq): the image's torch is refused below the second, doctor names both.
FLOAT8_TORCH, SCALED_MM_TORCH = "2.1", "2.5"


@dataclass(frozen=True)
class CudaRelease:
    """A CUDA release: the oldest Linux driver that runs it natively, and NVIDIA's smallest
    image of it with the python3 of the Ubuntu under that image."""

    driver: str
    base: str
    python: str


# The minimum driver per CUDA release is the GA row of NVIDIA's "CUDA Toolkit and Corresponding
# Driver Versions" table (Linux x86_64; CUDA Toolkit release notes, docs.nvidia.com/cuda/
# cuda-toolkit-release-notes, read 2026-11-22): the driver of that version or newer reports
# that CUDA version. A base image's NVIDIA_REQUIRE_CUDA ("cuda>=12.4 brand=tesla,driver>=535,
# driver<536 ..." in nvidia/cuda's Dockerfiles) makes the container toolkit refuse to start it
# ("unsatisfied condition: cuda>=12.4") on a driver reporting less; its other, space-separated
# (OR) terms admit older datacenter branches only through the forward-compatibility package,
# which is not relied on here. So a base's CUDA must not exceed what the driver runs natively.
# The "base" tags carry only cudart (the torch wheels bring their own CUDA libraries); Ubuntu
# 24.04 images exist from CUDA 12.5 on.
CUDA_RELEASES: dict[str, CudaRelease] = {
    "11.8": CudaRelease("520.61.05", "nvidia/cuda:11.8.0-base-ubuntu22.04", "3.10"),
    "12.0": CudaRelease("525.60.13", "nvidia/cuda:12.0.1-base-ubuntu22.04", "3.10"),
    "12.1": CudaRelease("530.30.02", "nvidia/cuda:12.1.1-base-ubuntu22.04", "3.10"),
    "12.2": CudaRelease("535.54.03", "nvidia/cuda:12.2.2-base-ubuntu22.04", "3.10"),
    "12.3": CudaRelease("545.23.06", "nvidia/cuda:12.3.2-base-ubuntu22.04", "3.10"),
    "12.4": CudaRelease("550.54.14", "nvidia/cuda:12.4.1-base-ubuntu22.04", "3.10"),
    "12.5": CudaRelease("555.42.02", "nvidia/cuda:12.5.1-base-ubuntu24.04", "3.12"),
    "12.6": CudaRelease("560.28.03", "nvidia/cuda:12.6.3-base-ubuntu24.04", "3.12"),
    "12.8": CudaRelease("570.26", "nvidia/cuda:12.8.1-base-ubuntu24.04", "3.12"),
    "12.9": CudaRelease("575.51.03", "nvidia/cuda:12.9.1-base-ubuntu24.04", "3.12"),
    "13.0": CudaRelease("580.65.06", "nvidia/cuda:13.0.0-base-ubuntu24.04", "3.12"),
}
# CUDA minor-version compatibility: an application built with any release of a CUDA major (as
# PyTorch's cuXYZ wheels are) runs, with a limited feature set (no PTX newer than the driver's
# JIT), on a driver of at least that major's floor: 11.x >= 450.80.02, 12.x >= 525, 13.x >= 580
# (NVIDIA, "CUDA Compatibility: Minor Version Compatibility", docs.nvidia.com/deploy/
# cuda-compatibility/minor-version-compatibility.html). The 12.x and 13.x floors are the
# drivers of 12.0 and 13.0.
MAJOR_FLOOR = {"11": "450.80.02", "12": "525.60.13", "13": "580.65.06"}
# The CUDA flavours PyTorch publishes wheels of, per torch release (download.pytorch.org/whl;
# pytorch.org/get-started/previous-versions).
TORCH_FLAVOURS = {
    "2.5": ("cu118", "cu121", "cu124"),
    "2.6": ("cu118", "cu124", "cu126"),
    "2.7": ("cu118", "cu126", "cu128"),
    "2.8": ("cu126", "cu128", "cu129"),
    "2.9": ("cu126", "cu128", "cu130"),
    "2.10": ("cu126", "cu128", "cu130"),
    "2.11": ("cu126", "cu128", "cu130"),
}

DEFAULT_CUDA = "13.0"
DEFAULT_IMAGE: dict[str, str] = {
    # CUDA 13.0 to match the cu130 wheels (see CUDA_RELEASES): what a host whose driver is not
    # known gets; a known driver picks its own flavour and base (`resolve_image`).
    "base": CUDA_RELEASES[DEFAULT_CUDA].base,
    "python": CUDA_RELEASES[DEFAULT_CUDA].python,  # wheels are built per Python version
    "cuda": "cu130",  # the PyTorch wheel flavour: cuXYZ or cpu
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "diffusers": "0.40.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "torchao": "0.17.0",
    # Off: diffusers runs SD3 attention through torch's SDPA (flash / cuDNN kernels) already, and
    # xformers would tie the image to one more build of torch.
    "xformers": "",
    # Off: FlashAttention-3 (the compiled blocks' attention on Hopper, ~12 ms a step faster than
    # cuDNN on an H200) has no published wheel for the image's torch. Built from its source by
    # bench/fa3/build.py into the wheelhouse, it is pinned here by its version; the wheel's local
    # label names the flavour and torch it was built for (3.0.0+cu130torch2.11).
    "flash_attn_3": "",
    "debugpy": "1.8.22",
    # The generation service's web server (the `service` step runs templates/service/sd35_api.py
    # in this image): FastAPI for request validation as declared models (a 4xx naming the
    # field, never a half-read request reaching the GPU) on Starlette's async core, which
    # answers /health and turns a full queue into 429 while the one GPU worker thread
    # generates; uvicorn, its reference ASGI server, in pure Python (h11: no compiled extras to
    # match the base's Python). Tested together: fastapi 0.165.0 with uvicorn 0.54.0.
    "fastapi": "0.165.0",
    "uvicorn": "0.54.0",
    # A directory on the host holding every wheel the image needs (air-gapped hosts); empty:
    # torch and torchvision from PyTorch's index for the flavour, the rest from PyPI.
    "wheelhouse": "",
    # A `docker save` archive of the base image on the host, loaded when the base is missing
    # (air-gapped hosts, and sandboxes: neither reaches a registry).
    "base_archive": "",
}
# Keys whose empty value leaves the package (or the wheelhouse, or the archive) out.
OPTIONAL = frozenset({"torchvision", "xformers", "flash_attn_3", "wheelhouse", "base_archive"})

# torchao ships C++/CUDA kernels built against one torch release and, on another, skips or fails
# loading them (pytorch/ao#2919). From each release's torchao/__init__.py: version -> torch minor.
TORCHAO_BUILT_FOR = {
    "0.13.0": "2.8",
    "0.14.0": "2.8",
    "0.14.1": "2.9",
    "0.15.0": "2.9",
    "0.16.0": "2.10",
    "0.17.0": "2.11",
}
# xformers wheels require the torch they were built for (their Requires-Dist on PyPI):
# version -> (lowest, highest) torch minor; 0.0.35 is built on torch's stable ABI (torch>=2.10).
XFORMERS_TORCH = {
    "0.0.32.post2": ("2.8", "2.8"),
    "0.0.33.post2": ("2.9", "2.9"),
    "0.0.34": ("2.10", "2.10"),
    "0.0.35": ("2.10", None),
}

VERSION = re.compile(r"^\d+\.\d+(\.\d+)?(\.post\d+)?$")
FLAVOUR = re.compile(r"^(cpu|cu(\d+)(\d))$")  # cu130 -> CUDA 13.0
CUDA_BASE = re.compile(r"(^|/)nvidia/cuda:(\d+)\.(\d+)")


class ImageError(InventoryError):
    """An `[image]` entry that cannot work; `key` is the entry to point the user at."""

    def __init__(self, key: str, problem: str, remedy: str) -> None:
        super().__init__(problem, remedy)
        self.key = key


@dataclass(frozen=True)
class ImageSpec:
    """A checked version table: what the Dockerfile and requirements.txt are rendered from."""

    base: str
    python: str
    cuda: str
    torch: str
    torchvision: str
    diffusers: str
    transformers: str
    accelerate: str
    torchao: str
    xformers: str
    flash_attn_3: str
    debugpy: str
    fastapi: str
    uvicorn: str
    wheelhouse: str
    base_archive: str
    driver: str = ""  # the host's NVIDIA driver the flavour and base were chosen for, if known
    torch_root: str = PYTORCH_INDEX  # PyTorch's own index root, or the inventory's mirror of it

    @property
    def torch_index(self) -> str:
        """PyTorch's index for the wheel flavour (where torch+cu130 or torch+cpu lives), under
        PyTorch's own root or a mirror of it."""
        return f"{self.torch_root.rstrip('/')}/{self.cuda}"

    @property
    def choice(self) -> str:
        """What the host's driver made of the image, in one line for plans and reports."""
        flavour = FLAVOUR.match(self.cuda)
        wheels = f"{self.cuda} wheels"
        running = _version(self.driver)
        if flavour and flavour.group(2) and running:
            native = _native_cuda(running)
            cuda = f"{flavour.group(2)}.{flavour.group(3)}"
            if native and _release(cuda) > _release(native):
                wheels += (f" (CUDA {cuda} on a CUDA {native} driver: minor-version "
                           "compatibility)")
        elif flavour and flavour.group(2):
            wheels += f" (need driver {MAJOR_FLOOR[flavour.group(2)]} or newer)"
        source = f"driver {self.driver}" if self.driver else "no NVIDIA driver known"
        return f"{source} → {wheels}, base {self.base}"

    def pins(self) -> tuple[str, ...]:
        """requirements.txt lines. torch and torchvision carry the flavour's local label, so pip
        can only install the build for this flavour, never PyPI's default one; flash_attn_3's
        names the torch too (`bench/fa3/build.py` labels the wheel so)."""
        labels = {"torch": self.cuda, "torchvision": self.cuda,
                  "flash_attn_3": f"{self.cuda}torch{_minor(self.torch)}"}
        packages = ("torch", "torchvision", "torchao", "xformers", "flash_attn_3", "diffusers",
                    "transformers", "accelerate", "debugpy", "fastapi", "uvicorn")
        return tuple(
            f"{name}=={version}+{labels[name]}" if name in labels else f"{name}=={version}"
            for name in packages
            if (version := getattr(self, name))
        )


def resolve_image(image_table: dict[str, str], driver: str | None = None,
                  torch_root: str = PYTORCH_INDEX) -> ImageSpec:
    """The inventory's `[image]` overrides over the defaults, checked as a whole; its torch
    wheels come from `torch_root` (PyTorch's index, or a mirror of it).

    `driver` is the host's NVIDIA driver version (`nvidia-smi`), when the image is for a host
    with one: the flavour (unless `cuda` is overridden) is then the newest it runs natively,
    else the oldest of its CUDA major, which it runs through minor-version compatibility; the
    base (unless overridden) is the newest CUDA release of the flavour's major that neither
    exceeds the flavour nor the driver. An override the driver cannot run is refused.
    """
    unknown = sorted(set(image_table) - set(DEFAULT_IMAGE))
    if unknown:
        raise ImageError(unknown[0], f"[image] {unknown[0]}: unknown key",
                         f"known keys are {', '.join(DEFAULT_IMAGE)}")
    table = {**DEFAULT_IMAGE, **image_table}
    for key, value in table.items():
        _check_form(key, value)
    running = _version(driver or "")
    base = CUDA_BASE.search(table["base"]) if "base" in image_table else None
    if (running or base) and "cuda" not in image_table:
        table["cuda"] = _flavour_for(table["torch"], running, driver or "",
                                     f"{base.group(2)}.{base.group(3)}" if base else None)
    if "base" not in image_table:
        release = _base_release(table["cuda"], running)
        table["base"] = CUDA_RELEASES[release].base
        if "python" not in image_table:
            table["python"] = CUDA_RELEASES[release].python
    spec = ImageSpec(**table, driver=(driver or "") if running else "", torch_root=torch_root)
    for check in (_fp8_torch, _diffusers, _torchao, _torchvision, _xformers, _flash_attn_3,
                  _flavour_published, _driver_runs, _base_cuda, _base_python):
        check(spec, image_table)
    return spec


def _flavour_for(torch: str, running: tuple[int, ...], driver: str,
                 base: str | None) -> str:
    """The flavour of `torch` for this driver (() unknown, taken to run them all): the
    newest it runs natively, else the oldest of a major it runs through minor-version
    compatibility (the least that relies on it). A base the inventory fixed (CUDA `base`)
    keeps the wheels to its major, and not older than it."""
    offered = tuple(f for f in TORCH_FLAVOURS.get(_minor(torch), ())
                    if base is None or (_major(_cuda_of(f)) == _major(base)
                                        and _release(_cuda_of(f)) >= _release(base)))
    if not offered:
        return DEFAULT_IMAGE["cuda"]  # nothing to choose from: the checks say why
    if not running:
        return max(offered, key=lambda f: _release(_cuda_of(f)))
    native = [f for f in offered if running >= _version(CUDA_RELEASES[_cuda_of(f)].driver)]
    if native:
        return max(native, key=lambda f: _release(_cuda_of(f)))
    compatible = [f for f in offered if running >= _version(MAJOR_FLOOR[_major(_cuda_of(f))])]
    if compatible:
        return min(compatible, key=lambda f: _release(_cuda_of(f)))
    floor = min((MAJOR_FLOOR[_major(_cuda_of(f))] for f in offered), key=_version, default="")
    raise InventoryError(
        f"[image] torch = {torch!r}: none of its CUDA flavours "
        f"({', '.join(offered) or 'none known to provision'}) runs on NVIDIA driver {driver}"
        + (f" (they need {floor} or newer)" if floor else ""),
        "upgrade the host's NVIDIA driver, or pin [image] torch to a release built for its CUDA")


def _base_release(flavour: str, running: tuple[int, ...]) -> str:
    """The newest CUDA release with a base image that the wheels' major shares, that is no
    newer than the wheels, and that the driver (when known) runs natively."""
    match = FLAVOUR.match(flavour)
    wheels = f"{match.group(2)}.{match.group(3)}" if match and match.group(2) else None
    fitting = [v for v, r in CUDA_RELEASES.items()
               if (wheels is None or (_major(v) == _major(wheels)
                                      and _release(v) <= _release(wheels)))
               and (not running or running >= _version(r.driver))]
    # Nothing fits only when the driver cannot run the flavour at all: _driver_runs says so.
    return max(fitting, key=_release) if fitting else DEFAULT_CUDA


def _refuse(keys: tuple[str, ...], spec: ImageSpec, overrides: dict[str, str],
            reason: str) -> ImageError:
    """Name each key involved with its value, and whether it is the user's or the default."""
    named = " and ".join(
        f"{key} = {getattr(spec, key)!r}{'' if key in overrides else ' (default)'}"
        for key in keys
    )
    defaults = ", ".join(f'{key} = "{DEFAULT_IMAGE[key]}"' for key in keys)
    return ImageError(
        next((key for key in keys if key in overrides), keys[0]),
        f"[image] {named}: {reason}",
        f"fix provision.toml's [image] table, or remove the override to use the tested "
        f"defaults ({defaults})",
    )


def _check_form(key: str, value: str) -> None:
    if not value:
        if key in OPTIONAL:
            return
        raise ImageError(key, f"[image] {key}: may not be empty",
                         "remove it to use the tested default")
    if key == "base":
        ok, form = bool(safe.IMAGE_REFERENCE.match(value)), safe.FORMS[safe.IMAGE_REFERENCE]
    elif key == "python":
        ok, form = re.fullmatch(r"3\.\d+", value) is not None, 'a version like "3.12"'
    elif key == "cuda":
        ok, form = FLAVOUR.match(value) is not None, 'a wheel flavour like "cu130" or "cpu"'
    elif key in ("wheelhouse", "base_archive"):
        what = "directory" if key == "wheelhouse" else "file"
        ok, form = (safe.problem(value, safe.ABSOLUTE_PATH) is None,
                    f"an absolute {what} on the host, of letters, digits and ._+@/- (no "
                    "spaces, quotes or '..')")
    else:
        ok, form = (VERSION.match(value) is not None,
                    'an exact public version like "2.11.0" (the flavour comes from `cuda`)')
    if not ok:
        raise ImageError(key, f"[image] {key} = {value!r}: must be {form}",
                         "fix it in provision.toml's [image] table")
    if key == "python" and _release(value) < (3, 10):
        raise ImageError(key, f"[image] python = {value!r}: the pinned diffusers, transformers "
                              "and torchvision need Python 3.10 or newer",
                         "use a base image with a newer python3")


def _fp8_torch(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if _release(spec.torch) < _release(FLOAT8_TORCH):
        raise _refuse(("torch",), spec, overrides,
                      f"torch.float8_e4m3fn (FP8 weights) exists only since torch {FLOAT8_TORCH}")
    if _release(spec.torch) < _release(SCALED_MM_TORCH):
        raise _refuse(("torch",), spec, overrides, "--fp8 dq needs rowwise-scaled "
                      f"torch._scaled_mm, new in torch {SCALED_MM_TORCH}")


def _diffusers(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if _release(spec.diffusers) < (0, 33):
        raise _refuse(("diffusers",), spec, overrides,
                      "--fp8 storage needs layerwise casting, new in diffusers 0.33 (SD3.5 "
                      "itself needs 0.31)")


def _torchao(spec: ImageSpec, overrides: dict[str, str]) -> None:
    built_for = TORCHAO_BUILT_FOR.get(spec.torchao)
    if built_for is None:
        raise _refuse(("torchao",), spec, overrides,
                      f"not a torchao release provision knows the torch build of (known: "
                      f"{', '.join(TORCHAO_BUILT_FOR)})")
    torch_minor = _minor(spec.torch)
    # On a CPU image dq falls back to storage, so torchao is only imported: its Python side
    # works on a newer torch (0.17 only logs that its CUDA kernels did not load).
    newer_ok = spec.cuda == "cpu" and _release(torch_minor) > _release(built_for)
    if torch_minor != built_for and not newer_ok:
        match = [v for v, t in TORCHAO_BUILT_FOR.items() if t == torch_minor]
        hint = f' (for torch {torch_minor}: torchao "{match[-1]}")' if match else ""
        raise _refuse(("torchao", "torch"), spec, overrides,
                      f"torchao {spec.torchao} is built against torch {built_for}; on another "
                      f"torch its C++/CUDA extensions are skipped or fail to load{hint}")


def _torchvision(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if not spec.torchvision:
        return
    major, minor = _release(spec.torch)[:2]
    wanted = f"0.{minor + 15}" if major == 2 else None  # torch 2.N pairs with torchvision 0.N+15
    if _minor(spec.torchvision) != wanted:
        raise _refuse(("torchvision", "torch"), spec, overrides,
                      f"each torchvision wheel requires one torch release (torch "
                      f"{_minor(spec.torch)} pairs with torchvision {wanted})")


def _cuda_only(key: str, spec: ImageSpec, overrides: dict[str, str], kernels: str) -> None:
    """An attention package whose kernels need an NVIDIA GPU has no place in a CPU image."""
    if spec.cuda == "cpu":
        raise _refuse((key, "cuda"), spec, overrides,
                      f"{kernels}: leave it out of a CPU image")


def _xformers(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if not spec.xformers:
        return
    _cuda_only("xformers", spec, overrides, "xformers' kernels are CUDA-only")
    if spec.xformers not in XFORMERS_TORCH:
        raise _refuse(("xformers",), spec, overrides,
                      f"not an xformers release provision knows the torch build of (known: "
                      f"{', '.join(XFORMERS_TORCH)})")
    low, high = XFORMERS_TORCH[spec.xformers]
    torch_minor = _release(_minor(spec.torch))
    if torch_minor < _release(low) or (high is not None and torch_minor > _release(high)):
        span = f"torch {low}" if low == high else f"torch {low} or newer"
        raise _refuse(("xformers", "torch"), spec, overrides,
                      f"xformers {spec.xformers} is built for {span}; against another torch "
                      "its kernels fail to load")


def _flash_attn_3(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if not spec.flash_attn_3:
        return
    _cuda_only("flash_attn_3", spec, overrides, "FlashAttention-3's kernels are for Hopper GPUs")
    if not spec.wheelhouse:
        raise _refuse(("flash_attn_3", "wheelhouse"), spec, overrides,
                      f"no index publishes FlashAttention-3 wheels for torch "
                      f"{_minor(spec.torch)}: build one (bench/fa3/build.py in provision's "
                      "source) into the wheelhouse")
    if _release(_minor(spec.torch)) < (2, 9):
        raise _refuse(("flash_attn_3", "torch"), spec, overrides,
                      "bench/fa3/build.py builds on torch's stable ABI, new in torch 2.9")


def _flavour_published(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if spec.cuda == "cpu":
        return
    offered = TORCH_FLAVOURS.get(_minor(spec.torch))
    if offered is None:
        raise _refuse(("torch", "cuda"), spec, overrides,
                      f"provision does not know which CUDA flavours torch {_minor(spec.torch)} "
                      f"has wheels for (known: torch {', '.join(TORCH_FLAVOURS)})")
    if spec.cuda not in offered:
        raise _refuse(("cuda", "torch"), spec, overrides,
                      f"PyTorch publishes no {spec.cuda} wheels of torch {_minor(spec.torch)} "
                      f"(its flavours: {', '.join(offered)})")


def _base_cuda(spec: ImageSpec, overrides: dict[str, str]) -> None:
    base, flavour = CUDA_BASE.search(spec.base), FLAVOUR.match(spec.cuda)
    if base and flavour and flavour.group(2):
        base_cuda, wheel_cuda = base.group(2, 3), flavour.group(2, 3)
        if base_cuda[0] != wheel_cuda[0] or _release(".".join(base_cuda)) > _release(
                ".".join(wheel_cuda)):
            raise _refuse(("base", "cuda"), spec, overrides,
                          f"the base image is CUDA {'.'.join(base_cuda)} but the wheels are "
                          f"built for CUDA {'.'.join(wheel_cuda)}: the container toolkit's "
                          "driver check would test the wrong version (the base must be of "
                          "the wheels' CUDA major, and not newer)")


def _base_python(spec: ImageSpec, overrides: dict[str, str]) -> None:
    chosen = next((r for r in CUDA_RELEASES.values() if r.base == spec.base), None)
    if "base" not in overrides and chosen and spec.python != chosen.python:
        raise _refuse(("python",), spec, overrides,
                      f"the base chosen for this host ({spec.base}) has python {chosen.python}"
                      "; set base in [image] too, or remove python")


def _driver_runs(spec: ImageSpec, overrides: dict[str, str]) -> None:
    """On a host whose driver is known: the wheels and the base must both run on it."""
    running = _version(spec.driver)
    if not running:
        return
    native = _native_cuda(running) or "none"
    flavour, base = FLAVOUR.match(spec.cuda), CUDA_BASE.search(spec.base)
    if flavour and flavour.group(2):
        needed = MAJOR_FLOOR[flavour.group(2)]
        if running < _version(needed):
            raise _driver_refusal("cuda", spec, needed,
                                  f"PyTorch's {spec.cuda} wheels need CUDA "
                                  f"{flavour.group(2)}.x", native)
    if base:
        cuda = f"{base.group(2)}.{base.group(3)}"
        if cuda not in CUDA_RELEASES:
            raise _refuse(("base",), spec, overrides,
                          f"provision does not know which NVIDIA driver CUDA {cuda} needs "
                          f"(known: {', '.join(CUDA_RELEASES)})")
        needed = CUDA_RELEASES[cuda].driver
        if running < _version(needed):
            raise _driver_refusal("base", spec, needed,
                                  f"the container toolkit starts a CUDA {cuda} base "
                                  f"(NVIDIA_REQUIRE_CUDA cuda>={cuda}) only on a driver that "
                                  "runs it", native)


def _driver_refusal(key: str, spec: ImageSpec, needed: str, why: str,
                    native: str) -> InventoryError:
    running = _version(spec.driver)
    try:
        suggestion = (_flavour_for(spec.torch, running, spec.driver, None) if key == "cuda"
                      else CUDA_RELEASES[_base_release(spec.cuda, running)].base)
    except InventoryError:  # no flavour of this torch runs there at all
        suggestion = f"no flavour of torch {_minor(spec.torch)}"
    return InventoryError(
        f"[image] {key} = {getattr(spec, key)!r}: needs NVIDIA driver {needed} or newer ({why})"
        f"; this host's driver {spec.driver} runs CUDA {native}",
        f"upgrade the host's driver to {needed} or newer, or remove {key} from [image] "
        f"(provision picks {suggestion} for this driver)")


def _version(text: str) -> tuple[int, ...]:
    """A driver version ("550.127.05") as numbers to compare; () when it is not one."""
    parts = text.strip().split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()


def _native_cuda(running: tuple[int, ...]) -> str | None:
    """The newest CUDA release (of those known) that this driver runs natively."""
    supported = [v for v, r in CUDA_RELEASES.items() if running >= _version(r.driver)]
    return max(supported, key=_release) if supported else None


def _major(version: str) -> str:
    return version.split(".")[0]


def _cuda_of(flavour: str) -> str:
    """"cu126" -> "12.6"."""
    digits = flavour.removeprefix("cu")
    return f"{digits[:-1]}.{digits[-1]}"


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("0.0.33.post2" -> (0, 0, 33)) for ordering."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])

