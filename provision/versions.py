"""The one table of versions the team image is built from, and the rules that keep it whole.

The defaults were installed together and measured: torch 2.11.0 (cu130), diffusers 0.40.0,
transformers 5.17.0, torchao 0.17.0 and accelerate 1.15.0 generated SD3.5 in bf16 and in both FP8
modes, compiled, on an H200 (bench/results/fp8-h200). An inventory may override any entry in its
`[image]` table; `resolve_image` refuses, before anything is rendered or built, an override that
breaks one of the rules below, naming the key and the reason, so a bad pin fails in `provision`
and not twenty minutes into an image build or at the first FP8 matmul.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from provision import safe
from provision.errors import InventoryError

PYTORCH_INDEX = "https://download.pytorch.org/whl"

DEFAULT_IMAGE: dict[str, str] = {
    # CUDA 13.0 to match the cu130 wheels: the image's NVIDIA_REQUIRE_CUDA makes the container
    # toolkit refuse a driver too old for them when the container starts, not at torch's first
    # CUDA call. The small "base" variant: the torch wheels bring their own cuBLAS and cuDNN.
    "base": "nvidia/cuda:13.0.0-base-ubuntu24.04",
    "python": "3.12",  # the base's python3 (Ubuntu 24.04); wheels are built per Python version
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
    "debugpy": "1.8.22",
    # A directory on the host holding every wheel the image needs (air-gapped hosts); empty:
    # torch and torchvision from PyTorch's index for the flavour, the rest from PyPI.
    "wheelhouse": "",
    # A `docker save` archive of the base image on the host, loaded when the base is missing
    # (air-gapped hosts, and sandboxes: neither reaches a registry).
    "base_archive": "",
}
# Keys whose empty value leaves the package (or the wheelhouse, or the archive) out.
OPTIONAL = frozenset({"torchvision", "xformers", "wheelhouse", "base_archive"})

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
    debugpy: str
    wheelhouse: str
    base_archive: str

    @property
    def index_url(self) -> str:
        """PyTorch's index for the wheel flavour (where torch+cu130 or torch+cpu lives)."""
        return f"{PYTORCH_INDEX}/{self.cuda}"

    def pins(self) -> tuple[str, ...]:
        """requirements.txt lines. torch and torchvision carry the flavour's local label, so pip
        can only install the build for this flavour, never PyPI's default one."""
        flavoured = {"torch", "torchvision"}
        packages = ("torch", "torchvision", "torchao", "xformers", "diffusers", "transformers",
                    "accelerate", "debugpy")
        return tuple(
            f"{name}=={version}+{self.cuda}" if name in flavoured else f"{name}=={version}"
            for name in packages
            if (version := getattr(self, name))
        )


def resolve_image(image_table: dict[str, str]) -> ImageSpec:
    """The inventory's `[image]` overrides over the defaults, checked as a whole."""
    unknown = sorted(set(image_table) - set(DEFAULT_IMAGE))
    if unknown:
        raise ImageError(unknown[0], f"[image] {unknown[0]}: unknown key",
                         f"known keys are {', '.join(DEFAULT_IMAGE)}")
    table = {**DEFAULT_IMAGE, **image_table}
    for key, value in table.items():
        _check_form(key, value)
    spec = ImageSpec(**table)
    for check in (_fp8_torch, _diffusers, _torchao, _torchvision, _xformers, _base_cuda):
        check(spec, image_table)
    return spec


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
    if _release(spec.torch) < (2, 1):
        raise _refuse(("torch",), spec, overrides,
                      "torch.float8_e4m3fn (FP8 weights) exists only since torch 2.1")
    if _release(spec.torch) < (2, 5):
        raise _refuse(("torch",), spec, overrides,
                      "--fp8 dq needs rowwise-scaled torch._scaled_mm, new in torch 2.5")


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


def _xformers(spec: ImageSpec, overrides: dict[str, str]) -> None:
    if not spec.xformers:
        return
    if spec.cuda == "cpu":
        raise _refuse(("xformers", "cuda"), spec, overrides,
                      "xformers' kernels are CUDA-only: leave it out of a CPU image")
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


def _base_cuda(spec: ImageSpec, overrides: dict[str, str]) -> None:
    base, flavour = CUDA_BASE.search(spec.base), FLAVOUR.match(spec.cuda)
    if base and flavour and flavour.group(2):
        base_cuda, wheel_cuda = base.group(2, 3), flavour.group(2, 3)
        if base_cuda != wheel_cuda:
            raise _refuse(("base", "cuda"), spec, overrides,
                          f"the base image is CUDA {'.'.join(base_cuda)} but the wheels are "
                          f"built for CUDA {'.'.join(wheel_cuda)}: the container toolkit's "
                          "driver check would test the wrong version")


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version ("0.0.33.post2" -> (0, 0, 33)) for ordering."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])

