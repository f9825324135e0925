"""Build FlashAttention-3's forward kernels for SD3.5's attention only (issue 27): head dim 64,
bf16 and FP8 (e4m3), sm90a, no backward, split, paged or appended KV, local, softcap, pack-GQA,
fp16, varlen, clusters or SM8x paths: four translation units instead of hundreds.

Source: Dao-AILab/flash-attention's `hopper/` and NVIDIA/cutlass's `include/` at the commit the
former pins as its `csrc/cutlass` submodule, unpacked side by side (`SRC/hopper`,
`SRC/csrc/cutlass/include`). Built with torch.utils.cpp_extension against the running torch
(its stable ABI, torch >= 2.9, as hopper/setup.py does) into OUT/flash_attn_3/_C.abi3.so, with
flash_attn_interface.py and the flash_attn_config.py that setup.py would write, then packed as
the wheel the team image installs from its wheelhouse (`[image] flash_attn_3`, docs/reference.md):
OUT/dist/flash_attn_3-VERSION+LABEL-cp39-abi3-linux_x86_64.whl, LABEL naming the CUDA flavour
and torch it was built for (cu130torch2.11), as provision's pin does.

  MAX_JOBS=16 python3 bench/fa3/build.py SRC OUT
  python3 bench/fa3/build.py SRC OUT --library _C.abi3.so --label cu130torch2.11   (pack only)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# hopper/setup.py's switches, the ones this build turns off; HDIM64 and FP8 stay on.
DISABLED = ("BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16",
            "VARLEN", "CLUSTER", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x")
SOURCES = ("flash_api_stable.cpp", "instantiations/flash_fwd_hdim64_bf16_sm90.cu",
           "instantiations/flash_fwd_hdim64_e4m3_sm90.cu", "flash_prepare_scheduler.cu")
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
              "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-DCUTLASS_DEBUG_TRACE_LEVEL=0", "-DNDEBUG"]
# A setup.py for a library built already: setuptools packs it as a platform wheel on the
# stable ABI (cp39-abi3), as hopper/setup.py's own build would be tagged.
SETUP = """from setuptools import setup
from setuptools.dist import Distribution


class Built(Distribution):
    def has_ext_modules(self):
        return True


setup(name="flash_attn_3", version={version!r}, description="FlashAttention-3 (SD3.5 build)",
      packages=["flash_attn_3"], package_data={{"flash_attn_3": ["_C.abi3.so"]}},
      py_modules=["flash_attn_interface", "flash_attn_config"], distclass=Built,
      options={{"bdist_wheel": {{"py_limited_api": "cp39"}}}})
"""


def config_source() -> str:
    """flash_attn_config.py as hopper/setup.py writes it, for this build's switches."""
    names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16",
             "FP8", "VARLEN", "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256",
             "SM8x"]
    flags = {f"FLASHATTENTION_DISABLE_{n}": n in DISABLED for n in names}
    flags |= {"FLASHATTENTION_ENABLE_VCOLMAJOR": False,
              "FLASH_ATTENTION_DISABLE_HDIMDIFF64": True,
              "FLASH_ATTENTION_DISABLE_HDIMDIFF192": True}
    return f"CONFIG = {{'build_flags': {flags!r}}}\n"


def compile_library(src: Path, out: Path) -> tuple[Path, str]:
    """Compile the four translation units against the running torch; the library and its
    label (the CUDA flavour and torch it is built for)."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    cccl = Path(CUDA_HOME) / "include" / "cccl"  # CUDA 13 moved CUB/Thrust/libcu++ here
    os.environ["CPLUS_INCLUDE_PATH"] = f"{cccl}:{os.environ.get('CPLUS_INCLUDE_PATH', '')}"
    hopper = src / "hopper"
    features = [f"-DFLASHATTENTION_DISABLE_{n}" for n in DISABLED]
    features += ["-DFLASHATTENTION_DISABLE_HDIMDIFF64", "-DFLASHATTENTION_DISABLE_HDIMDIFF192"]
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    library = load(
        name="_C", sources=[str(hopper / s) for s in SOURCES], build_directory=str(build),
        extra_cflags=["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000",
                      "-DTORCH_TARGET_VERSION=0x0209000000000000", *features],
        extra_cuda_cflags=["--threads", "4", *NVCC_FLAGS, *features],
        extra_include_paths=[str(hopper), str(src / "csrc" / "cutlass" / "include")],
        is_python_module=False, verbose=True,
    )
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    label = f"cu{torch.version.cuda.replace('.', '')}torch{major}.{minor}"
    return Path(library if isinstance(library, str) else build / "_C.so"), label


def pack_wheel(src: Path, library: Path, label: str, out: Path) -> Path:
    """The library, FA3's Python interface and this build's config as a wheel in OUT/dist."""
    version = re.search(r'__version__ = "([^"]+)"', (src / "hopper" / "__init__.py").read_text())
    if not version or not re.fullmatch(r"cu\d+torch\d+\.\d+", label):
        raise SystemExit(f"error: no FA3 version in {src}/hopper/__init__.py or bad label {label}")
    with tempfile.TemporaryDirectory() as staging:
        stage = Path(staging)
        (stage / "flash_attn_3").mkdir()
        shutil.copy(library, stage / "flash_attn_3" / "_C.abi3.so")
        (stage / "flash_attn_3" / "__init__.py").write_text("")
        shutil.copy(src / "hopper" / "flash_attn_interface.py", stage)
        (stage / "flash_attn_config.py").write_text(config_source())
        (stage / "setup.py").write_text(SETUP.format(version=f"{version.group(1)}+{label}"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out / "dist"), str(stage)], check=True)
    return next((out / "dist").glob(f"flash_attn_3-{version.group(1)}+{label}-*.whl"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="hopper/ and csrc/cutlass/include/ side by side")
    p.add_argument("out", type=Path)
    p.add_argument("--library", type=Path, help="pack this _C.abi3.so, built earlier, only")
    p.add_argument("--label", help="with --library: the flavour and torch it was built for")
    args = p.parse_args()
    src, out = args.src.resolve(), args.out.resolve()
    started = time.perf_counter()
    if args.library:
        library, label = args.library, args.label or p.error("--library needs --label")
    else:
        library, label = compile_library(src, out)
    wheel = pack_wheel(src, library, label, out)
    # Importable from OUT as well (PYTHONPATH=OUT), as bench/fa3/attention.py runs it.
    shutil.unpack_archive(wheel, out, format="zip")
    print(f"built in {time.perf_counter() - started:.0f} s: {wheel} "
          f"({library.stat().st_size / 2**20:.1f} MiB library, {wheel.stat().st_size / 2**20:.1f}"
          " MiB wheel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
