"""Build FlashAttention-3's forward kernels for SD3.5's attention only (issue 27): head dim 64,
bf16 and FP8 (e4m3), sm90a, no backward, split, paged or appended KV, local, softcap, pack-GQA,
fp16, varlen, clusters or SM8x paths: four translation units instead of hundreds.

Source: Dao-AILab/flash-attention's `hopper/` and NVIDIA/cutlass's `include/` at the commit the
former pins as its `csrc/cutlass` submodule, unpacked side by side (`SRC/hopper`,
`SRC/csrc/cutlass/include`). Built with torch.utils.cpp_extension against the running torch
(its stable ABI, torch >= 2.9, as hopper/setup.py does) into OUT/flash_attn_3/_C.abi3.so, with
flash_attn_interface.py and the flash_attn_config.py that setup.py would write.

  MAX_JOBS=16 python3 bench/fa3/build.py SRC OUT
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

# hopper/setup.py's switches, the ones this build turns off; HDIM64 and FP8 stay on.
DISABLED = ("BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16",
            "VARLEN", "CLUSTER", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x")
SOURCES = ("flash_api_stable.cpp", "instantiations/flash_fwd_hdim64_bf16_sm90.cu",
           "instantiations/flash_fwd_hdim64_e4m3_sm90.cu", "flash_prepare_scheduler.cu")
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
              "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-DCUTLASS_DEBUG_TRACE_LEVEL=0", "-DNDEBUG"]


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


def main() -> int:
    src, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    from torch.utils.cpp_extension import CUDA_HOME, load

    cccl = Path(CUDA_HOME) / "include" / "cccl"  # CUDA 13 moved CUB/Thrust/libcu++ here
    os.environ["CPLUS_INCLUDE_PATH"] = f"{cccl}:{os.environ.get('CPLUS_INCLUDE_PATH', '')}"
    hopper = src / "hopper"
    features = [f"-DFLASHATTENTION_DISABLE_{n}" for n in DISABLED]
    features += ["-DFLASHATTENTION_DISABLE_HDIMDIFF64", "-DFLASHATTENTION_DISABLE_HDIMDIFF192"]
    build = out / "build"
    build.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    library = load(
        name="_C", sources=[str(hopper / s) for s in SOURCES], build_directory=str(build),
        extra_cflags=["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000",
                      "-DTORCH_TARGET_VERSION=0x0209000000000000", *features],
        extra_cuda_cflags=["--threads", "4", *NVCC_FLAGS, *features],
        extra_include_paths=[str(hopper), str(src / "csrc" / "cutlass" / "include")],
        is_python_module=False, verbose=True,
    )
    package = out / "flash_attn_3"
    package.mkdir(exist_ok=True)
    shutil.copy(library if isinstance(library, str) else build / "_C.so", package / "_C.abi3.so")
    (package / "__init__.py").write_text("")
    shutil.copy(hopper / "flash_attn_interface.py", out / "flash_attn_interface.py")
    (out / "flash_attn_config.py").write_text(config_source())
    size = (package / "_C.abi3.so").stat().st_size
    print(f"built in {time.perf_counter() - started:.0f} s: {package / '_C.abi3.so'} "
          f"({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
