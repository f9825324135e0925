#!/usr/bin/env python3
"""Generate one image with Stable Diffusion 3.5 in bf16 or FP8 and report what happened.

This file is copied into each member's workspace and run in the team's dev container (F5 in
VS Code), by `provision verify`, and by `bench/fp8_generation.py`. It is standalone on purpose:
it imports nothing from `provision`, only torch, diffusers, transformers and (for `--fp8 dq`)
torchao.

FP8 modes, because they trade different things:
  off      bf16 weights, bf16 compute: the reference image.
  storage  diffusers layerwise casting: FP8 (e4m3) weights cast to bf16 layer by layer. Saves
           weight memory, is slower than bf16 (the casts cost; no FP8 matmuls). Any GPU, or CPU.
  dq       torchao float8 dynamic activation + weight quantization, rowwise scales: real FP8
           matmuls (torch._scaled_mm). Needs CUDA compute capability >= 8.9 and torch >= 2.5;
           slower than bf16 unless compiled, so each transformer block is compiled (about half
           a minute the first time on an H200), with the Inductor cache in
           TORCHINDUCTOR_CACHE_DIR so later runs start their first step in seconds.
           Where it cannot run it falls back to `storage` with a warning (`--strict`: exit 2).

Under a debugger (VS Code's F5, `python -m debugpy`, any trace function or sys.monitoring
debugger) nothing is compiled, whatever `--fp8` or `--compile` say: breakpoints inside compiled
code never fire, and compiling under a tracing debugger takes many times longer. The transformer
then runs eager in the requested FP8 mode; stderr says so and the metrics carry the reason.

Weights: an HF id or local path loads from the HF cache (never downloads under
HF_HUB_OFFLINE=1), each safetensors file straight onto the GPU. `tiny`, `medium` and `large`
build that architecture with random weights, offline, seeded by `--seed`, so every FP8 mode of
one seed starts from the same weights: allocated on the GPU uninitialised (no default init to
throw away) and initialised in place. For `medium`/`large` the full-size text encoders (T5-XXL
alone is 4.7 B parameters) are not built and seeded random prompt embeddings of the right shapes
are passed instead; `tiny` builds tiny but real CLIP/T5 encoders and tokenizers so the whole
pipeline path runs on a CPU in seconds.

`--attention-maps DIR` saves, for the joint attention of `--attention-blocks` at
`--attention-step`, one heatmap PNG per prompt token (where that token attends in the image)
and an overlay on the final image: see attention_maps.py, which is also the helper to call
from the debug console. Without the flag nothing of it is imported or hooked.

Output: the PNG, and exactly one JSON line on stdout (everything else goes to stderr). Fields:
ok, device, gpu, compute_capability, cuda, torch, diffusers, transformers, torchao, model,
weights, text_encoders, fp8_requested, fp8_applied, fp8_fallback_reason, fp8_linear_layers,
linear_layers, compiled, compile_skipped_reason, inductor_cache_dir, seed, height, width,
steps, guidance, load_s, load_phases_s, first_step_s, step_ms_mean, step_ms_note, denoise_s,
decode_s, total_s, peak_mem_gib, peak_mem_kind, load_peak_mem_gib, transformer_weights_gib,
transformer_params, latents_shape, attention_maps, output. load_s runs from start to
ready-to-denoise (library imports, build or load, FP8 conversion; load_phases_s splits it);
compilation happens in the first step, so first_step_s holds it and step_ms_mean (on a GPU
timed by CUDA events, which do not stall the steps) leaves step 1 out. peak_mem_gib is the CUDA
allocator peak during generation (load_peak_mem_gib: while loading) on a GPU, the process's max
RSS on a CPU.
Exit codes: 0 done, 1 known error (one line on stderr), 2 usage or `--strict` refusal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple


@contextlib.contextmanager
def untraced_by_debugpy() -> Iterator[None]:
    """Run the block with this thread untraced by a connected debugpy, then trace it again.

    Why: under F5, debugpy traces every function that importing torch, torchao, diffusers and
    transformers runs; on the lent H200 that made the imports most of the seconds to the first
    breakpoint. Only library imports run in here: breakpoints in the libraries' import-time code
    do not fire, everything called after them (this file, the pipeline, the model) is traced.
    """
    debugpy = sys.modules.get("debugpy")
    if debugpy is None or not debugpy.is_client_connected():
        yield
        return
    debugpy.trace_this_thread(False)
    try:
        yield
    finally:
        debugpy.trace_this_thread(True)


with untraced_by_debugpy():
    import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline
    from PIL.Image import Image

GIB = 1024**3
DTYPE = torch.bfloat16
CLIP_TOKENS = 77  # CLIP context length; SD3 prompt embeddings are CLIP tokens + T5 tokens
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
# Looked up by name: torch < 2.1 has no float8 dtypes, and --fp8 off must still run there.
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"

# SD3.5 transformer configs (diffusers SD3Transformer2DModel), as published with the weights.
SD35_LARGE: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "dual_attention_layers": (),
}
SD35_MEDIUM: dict[str, Any] = {
    **SD35_LARGE,
    "num_layers": 24,
    "num_attention_heads": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}
# Same structure as Medium (dual attention, RMS qk-norm, 16 latent channels, patch 2), small
# enough to run on a CPU in seconds. Dims are multiples of 16 so torchao quantizes every Linear.
SD35_TINY: dict[str, Any] = {
    **SD35_LARGE,
    "sample_size": 32,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,  # = T5 d_model, >= the two CLIP widths side by side (32 + 32)
    "caption_projection_dim": 32,  # = heads x head dim, as in every SD3 config
    "pooled_projection_dim": 64,  # = the two CLIP projections side by side
    "pos_embed_max_size": 64,  # up to 1024 px
    "dual_attention_layers": (0,),
}
TRANSFORMER_CONFIGS = {"tiny": SD35_TINY, "medium": SD35_MEDIUM, "large": SD35_LARGE}
TEXT_COMPONENTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)

SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# Four blocks keep the 8x downsampling, so latents are [1, 16, H/8, W/8] as with the real VAE.
TINY_VAE: dict[str, Any] = {
    **SD3_VAE,
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}


class InferenceError(Exception):
    """A known failure: reported as one line on stderr, no traceback."""


class StrictRefusal(InferenceError):
    """`--strict` and the requested FP8 mode cannot run here."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (the contract used by launch.json, `provision verify`, the bench)."""
    p = argparse.ArgumentParser(
        description="SD3.5 generation in bf16 or FP8; prints one JSON metrics line on stdout.",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--output", default="outputs/sd35.png", help="PNG path (default: %(default)s)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--seed", type=int, default=0, help="seeds the noise and any random weights")
    p.add_argument(
        "--model",
        default="large",
        help="tiny|medium|large (random weights, offline) or an HF id / local path "
        "(default: %(default)s)",
    )
    p.add_argument("--fp8", choices=("off", "storage", "dq"), default="dq")
    p.add_argument("--compile", action="store_true", help="compile each transformer block")
    p.add_argument("--strict", action="store_true", help="fail instead of falling back from dq")
    p.add_argument("--guidance", type=float, default=3.5, help="CFG scale (default: %(default)s)")
    p.add_argument("--metrics", type=Path, help="also write the JSON metrics line to this file")
    p.add_argument(
        "--attention-maps",
        type=Path,
        metavar="DIR",
        help="save one heatmap PNG per prompt token (where it attends in the image) and "
        "overlay.png into DIR; runs the transformer eager",
    )
    p.add_argument(
        "--attention-blocks",
        type=block_list,
        metavar="N,M-K",
        help="joint transformer blocks to average the maps over (default: all)",
    )
    p.add_argument(
        "--attention-step",
        type=int,
        help="denoising step (1-based) to record the maps at (default: the middle one)",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.attention_step is not None and not 1 <= args.attention_step <= args.steps:
        p.error(f"--attention-step must be in 1..{args.steps}")
    if args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        p.error("--height and --width must be positive multiples of 16 (VAE 8x, patch 2)")
    return args


def block_list(text: str) -> list[int]:
    """`--attention-blocks`: "0,5,10-12" -> [0, 5, 10, 11, 12]."""
    blocks: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            blocks += range(int(first), int(last or first) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 0,5,10-12") from None
    if not blocks:
        raise argparse.ArgumentTypeError("no block given")
    return sorted(set(blocks))


def debugger_reason() -> str | None:
    """What is tracing this process (so compiling must not happen), or None.

    VS Code's F5 runs the program under debugpy, which traces with sys.settrace up to Python
    3.11 and registers as sys.monitoring's debugger tool from 3.12; `python -m debugpy`
    attached later shows as a connected client. Any trace function counts: compiled code would
    hide breakpoints from it, and compiling under it is many times slower.
    """
    debugpy = sys.modules.get("debugpy")
    if debugpy is not None and debugpy.is_client_connected():
        return "a debugpy client is connected"
    trace = sys.gettrace()
    if trace is not None:
        return f"a trace function is set ({getattr(trace, '__qualname__', type(trace).__name__)})"
    monitoring = getattr(sys, "monitoring", None)  # Python >= 3.12
    if monitoring is not None:
        tool = monitoring.get_tool(monitoring.DEBUGGER_ID)
        if tool is not None:
            return f"debugger {tool!r} is registered with sys.monitoring"
    return None


def compile_skipped_reason(args: argparse.Namespace) -> str | None:
    """Why the transformer must run eager although compilation was asked for, or None."""
    reason = debugger_reason()
    if reason:
        return f"{reason}: breakpoints inside compiled code never fire"
    if args.attention_maps:
        return "--attention-maps records attention in eager blocks"
    return None


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch, for the FP8 feature gates."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def package_version(name: str) -> str | None:
    """Installed version without importing the package (importing torchao is slow and noisy)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dq_unavailable_reason(device: torch.device) -> str | None:
    """Why torchao float8 dynamic quantization cannot run here, or None when it can."""
    if torch_version() < (2, 5):
        return (
            f"torch {torch.__version__} lacks rowwise-scaled torch._scaled_mm (needs torch >= 2.5)"
        )
    if device.type != "cuda":
        return "no CUDA GPU visible (FP8 matmuls need an NVIDIA GPU of compute capability >= 8.9)"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {cc[0]}.{cc[1]} < 8.9: no FP8 tensor cores"
    try:
        with untraced_by_debugpy():
            from torchao.quantization import (  # noqa: F401 - probing importability
                Float8DynamicActivationFloat8WeightConfig,
                PerRow,
            )
    except ImportError as exc:
        return f"torchao float8 API is not importable ({exc}); install torchao matching torch"
    return None


def resolve_fp8(requested: str, device: torch.device, strict: bool) -> tuple[str, str | None]:
    """Pick the FP8 mode that will actually run; refuse or warn loudly when it differs."""
    if requested == "off":
        return "off", None
    if not hasattr(torch, "float8_e4m3fn"):
        raise InferenceError(
            f"torch {torch.__version__} has no torch.float8_e4m3fn (added in torch 2.1): "
            "upgrade torch, or run with --fp8 off"
        )
    if requested == "storage":
        return "storage", None
    reason = dq_unavailable_reason(device)
    if reason is None:
        return "dq", None
    if strict:
        raise StrictRefusal(
            f"--fp8 dq cannot run: {reason}; drop --strict to fall back to --fp8 storage"
        )
    print(
        f"WARNING: --fp8 dq cannot run: {reason}. FALLING BACK to --fp8 storage "
        "(FP8 weights, bf16 compute, no FP8 matmuls, slower than bf16).",
        file=sys.stderr,
    )
    return "storage", reason


class Stopwatch:
    """Seconds spent in each loading phase, for the metrics' load_phases_s."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


@contextlib.contextmanager
def building_on(device: torch.device) -> Iterator[None]:
    """Create modules directly on `device` in bf16, their parameters left uninitialised.

    Building 8 B parameters in fp32 on the CPU and moving them takes minutes and twice the
    memory; allocating them where they will run, in their final dtype, takes a moment. torch's
    default init is skipped (diffusers' no_init_weights, as its from_pretrained does), since
    `init_random_` writes every parameter once, in place, right after.
    """
    from diffusers.models.modeling_utils import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with device, no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def init_random_(module: torch.nn.Module) -> None:
    """Write every parameter of a freshly built, uninitialised model, in place.

    Explicit, so random models are finite and well scaled whatever the memory held before:
    NaN/Inf or huge weights would break FP8 scaling and make the bf16-vs-FP8 comparison
    meaningless. Matrices (Linear, embeddings) N(0, 0.02); convolution kernels U(+-1/sqrt(fan
    in)), torch's default scale, so the VAE's convolutions neither vanish nor explode; other
    1-D weights (norm scales) 1; biases 0.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            elif param.ndim == 2:
                param.normal_(0.0, 0.02)
            else:
                bound = param[0].numel() ** -0.5
                param.uniform_(-bound, bound)


def tiny_tokenizer(max_length: int, add_bos: bool) -> Any:
    """A character-level fast tokenizer built in memory: real tokenization, no vocab download."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    template = "<bos> $A <eos>" if add_bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
    )


def tiny_text_stack() -> dict[str, Any]:
    """Two tiny CLIP text encoders and a tiny T5 encoder with tokenizers, as SD3 wires them.

    Built where the caller's `building_on` says, uninitialised."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    parts: dict[str, Any] = {
        "tokenizer": tiny_tokenizer(CLIP_TOKENS, add_bos=True),
        "tokenizer_2": tiny_tokenizer(CLIP_TOKENS, add_bos=True),
        "tokenizer_3": tiny_tokenizer(T5_TOKENS, add_bos=False),
    }
    vocab_size = len(parts["tokenizer"])
    clip = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_TOKENS,
        projection_dim=32,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    t5 = T5Config(
        vocab_size=vocab_size,
        d_model=SD35_TINY["joint_attention_dim"],
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=3,
        decoder_start_token_id=0,
    )
    parts["text_encoder"] = CLIPTextModelWithProjection(clip).eval()
    parts["text_encoder_2"] = CLIPTextModelWithProjection(clip).eval()
    parts["text_encoder_3"] = T5EncoderModel(t5).eval()
    return parts


def import_diffusers() -> None:
    """Import the diffusers (and so transformers) modules a run uses, at once: timed alone,
    and untraced under debugpy."""
    import diffusers.models.modeling_utils  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )


def random_pipeline(size: str, device: torch.device, seed: int) -> StableDiffusion3Pipeline:
    """SD3.5 `size` architecture with seeded random weights, built offline on `device`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if device.type == "cpu" and size != "tiny":
        print(
            f"warning: building SD3.5-{size} on the CPU takes minutes and tens of GB of RAM",
            file=sys.stderr,
        )
    with building_on(device):
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIGS[size])
        vae = AutoencoderKL(**(TINY_VAE if size == "tiny" else SD3_VAE))
        # The full-size encoders are never built: random prompt embeddings stand in for them.
        text = tiny_text_stack() if size == "tiny" else dict.fromkeys(TEXT_COMPONENTS)
    torch.manual_seed(seed)  # same seed -> same weights in every FP8 mode
    for part in (transformer, vae, *text.values()):
        if isinstance(part, torch.nn.Module):
            init_random_(part)
    # Cast the fp32 buffers (positional embeddings) with nn.Module.to: ModelMixin.to would warn
    # about from_pretrained's fp32-kept modules, which models built in code do not have.
    return StableDiffusion3Pipeline(
        transformer=torch.nn.Module.to(transformer, dtype=DTYPE).eval(),
        vae=torch.nn.Module.to(vae, dtype=DTYPE).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        **text,
    )


def pretrained_pipeline(model: str, device: torch.device) -> StableDiffusion3Pipeline:
    """Load SD3.5 weights from a local path or the HF cache; never download when offline.

    `device_map` puts each safetensors tensor straight onto the device (no CPU copy of 16 GB
    first, no default init of modules about to be overwritten).
    """
    from diffusers import StableDiffusion3Pipeline

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        return StableDiffusion3Pipeline.from_pretrained(
            model, torch_dtype=DTYPE, local_files_only=offline, device_map=device.type
        )
    except (OSError, ValueError) as exc:
        where = "the HF cache (HF_HUB_OFFLINE is set)" if offline else "the HF cache or the Hub"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InferenceError(
            f"cannot load {model!r} from {where}: {first} -- log in and accept the license, "
            "or use --model large|medium|tiny for random weights"
        ) from exc


def random_prompt_embeds(config: Any, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Seeded stand-ins for CLIP-L + CLIP-G + T5-XXL outputs, shaped as the pipeline expects."""
    g = torch.Generator().manual_seed(seed + 1)
    seq = CLIP_TOKENS + T5_TOKENS
    shapes = {
        "prompt_embeds": (1, seq, config.joint_attention_dim),
        "negative_prompt_embeds": (1, seq, config.joint_attention_dim),
        "pooled_prompt_embeds": (1, config.pooled_projection_dim),
        "negative_pooled_prompt_embeds": (1, config.pooled_projection_dim),
    }
    return {
        name: torch.randn(shape, generator=g).to(device=device, dtype=DTYPE)
        for name, shape in shapes.items()
    }


def apply_fp8(transformer: torch.nn.Module, mode: str) -> None:
    """Convert the transformer (only: it holds ~all FLOPs) to the resolved FP8 mode."""
    if mode == "storage":
        if not hasattr(transformer, "enable_layerwise_casting"):
            raise InferenceError(
                "this diffusers has no layerwise casting (added in diffusers 0.33): upgrade it"
            )
        transformer.enable_layerwise_casting(
            storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16
        )
    elif mode == "dq":
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        # set_inductor_config=False: torchao's recommended Inductor settings tune every kernel by
        # coordinate descent, again in every new process: on an H200 the first compiled step took
        # 231 s cold and 83 s with a warm cache, for steps 2% faster; without them 17 s and ~4 s
        # (bench/results/fp8-h200/variants/).
        config = Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False
        )
        quantize_(transformer, config)


def compile_blocks(transformer: torch.nn.Module) -> str:
    """Compile each transformer block in place; return the Inductor cache directory.

    Compiling the repeated block (not the whole model) compiles one graph and reuses it for
    every layer, and keeps the pipeline's Python code (and its breakpoints) eager. The cache
    lives in TORCHINDUCTOR_CACHE_DIR (kept if already set) so only the first run pays. Compiled
    blocks compute GELU in its sigmoid form and reduce narrow rows in one pass: kernel speed.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchinductor"
    cache_dir = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))
    use_sigmoid_gelu_(transformer)
    keep_rows_in_registers()
    for block in transformer.transformer_blocks:
        block.compile()
    return cache_dir


def sigmoid_form_gelu(gate: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as x * sigmoid(2z), the same function: 0.5(1 + tanh z).

    Inductor lowers tanh to libdevice's exact tanh, dozens of instructions per element: the
    feed-forward's GELU + FP8 row-quantisation kernel, which computes GELU twice (row maximum,
    then scaling), was compute-bound on it. sigmoid lowers to the hardware exp. Computed in
    float32 so eager code (CPU, debugger) rounds once, as F.gelu does.
    """
    x = gate.float()
    z = x + 0.044715 * x * x * x
    return (x * torch.sigmoid(1.5957691216057308 * z)).to(gate.dtype)


def use_sigmoid_gelu_(transformer: torch.nn.Module) -> int:
    """Send every tanh-approximate GELU of the model through `sigmoid_form_gelu`; count them."""
    from diffusers.models.activations import GELU

    swapped = 0
    for module in transformer.modules():
        if isinstance(module, GELU) and module.approximate == "tanh":
            module.gelu = sigmoid_form_gelu
            swapped += 1
    return swapped


# Rows up to this many elements are reduced in one pass (Inductor's own limit is 1024): the
# LayerNorm + modulation + FP8 row-quantisation kernels of SD3.5-Large (2432-wide rows) then read
# each row once instead of three times. The MLP's 9728-wide rows stay looped: one pass was slower
# there (bench/results/fp8-h200/variants/).
PERSISTENT_ROW_LIMIT = 4096


def keep_rows_in_registers() -> bool:
    """Have Inductor reduce rows up to PERSISTENT_ROW_LIMIT wide in one pass; False if it cannot.

    Uses the hook Inductor documents for its heuristics (a subclass of InductorChoices given to
    V.set_choices_handler); a torch without it, or whose heuristic takes other arguments, keeps
    its defaults. The choice changes kernel speed only, never results. It is not in the compile
    cache's key (torch's keyed variant, config.inductor_choices_class, puts the factory in a
    pickled, hashed config, where a closure breaks both); caches from before it miss anyway,
    the sigmoid GELU changed the graph.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    default = InductorChoices.should_use_persistent_reduction
    if len(inspect.signature(default).parameters) != 2:  # not (features, cooperative_reduction)
        return False

    class RowsInRegisters(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            numel = features.reduction_numel
            if (
                inductor_config.triton.persistent_reductions
                and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and (isinstance(numel, int) or getattr(numel, "is_Integer", False))
                and int(numel) <= PERSISTENT_ROW_LIMIT
            ):
                return True
            return default(features, cooperative_reduction)

    V.set_choices_handler(RowsInRegisters())
    return True


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside tensor subclasses (torchao float8 + scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def is_fp8_weight(w: torch.Tensor) -> bool:
    """Whether a Linear weight is stored as FP8 (layerwise casting) or an FP8 subclass (torchao)."""
    return w.dtype in FP8_DTYPES or hasattr(w, "__tensor_flatten__")


class StepTimer:
    """When each denoising step ends, on the device's own timeline.

    On CUDA a mark is an event recorded on the stream and read after the run: synchronising at
    every step would idle the GPU while the host launches the next step, a cost of measuring,
    not of the model (the pipeline itself never waits between steps). On the CPU the work is
    synchronous, and the host's clock is the device's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.marks: list[Any] = []  # CUDA events, or perf_counter seconds on the CPU
        self.clock = (
            "timed by CUDA events, no synchronisation between steps"
            if self.on_cuda
            else "timed by the host's clock"
        )

    def now(self) -> float:
        """The host's clock once the device has finished what was queued."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def mark(self) -> None:
        if self.on_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def on_transformer_call(self, _module: torch.nn.Module, _args: Any) -> None:
        """Forward pre-hook: marks the start of the first step only."""
        if not self.marks:
            self.mark()

    def on_step_end(
        self, _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """The pipeline's callback_on_step_end: marks the end of each step."""
        self.mark()
        return callback_kwargs

    def durations(self) -> list[float]:
        """Seconds between consecutive marks; on CUDA, once the last one has been reached."""
        if not self.on_cuda:
            return [b - a for a, b in itertools.pairwise(self.marks)]
        if self.marks:
            self.marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(self.marks)]


def decode(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> Image:
    """Undo SD3's latent scaling and shift, run the VAE, return the PIL image."""
    z = latents / pipe.vae.config.scaling_factor  # BREAKPOINT: latents before VAE decode
    z = z + pipe.vae.config.shift_factor
    pixels = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def start_attention_maps(
    args: argparse.Namespace, transformer: torch.nn.Module
) -> tuple[list[int], int, list[torch.Tensor]] | None:
    """With --attention-maps: hook the chosen blocks; (blocks, 0-based step, maps being filled)."""
    if not args.attention_maps:
        return None
    from attention_maps import record

    count = len(transformer.transformer_blocks)
    blocks = args.attention_blocks or list(range(count))
    if blocks[-1] >= count:
        raise InferenceError(f"--attention-blocks: this transformer has blocks 0..{count - 1}")
    step = (args.attention_step or (args.steps + 1) // 2) - 1
    return blocks, step, record(transformer, blocks, step)


def save_attention_maps(
    args: argparse.Namespace,
    pipe: StableDiffusion3Pipeline,
    recording: tuple[list[int], int, list[torch.Tensor]],
    image: Image,
) -> dict[str, Any]:
    """Write the recorded maps (averaged over the blocks) as PNGs; their part of the metrics."""
    from attention_maps import prompt_tokens, save_maps

    blocks, step, maps = recording
    tokens, source = prompt_tokens(pipe, args.prompt)
    patch = pipe.transformer.config.patch_size * pipe.vae_scale_factor
    grid = (args.height // patch, args.width // patch)
    files = save_maps(torch.stack(maps).mean(dim=0), tokens, grid, image, args.attention_maps)
    return {
        "dir": str(args.attention_maps),
        "blocks": blocks,
        "step": step + 1,
        "tokens": [label for _, label in tokens],
        "token_source": source,
        "files": [p.name for p in files],
        "overlay": "overlay.png",
    }


def memory_peak_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA allocator peak on a GPU, process max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, "process_max_rss"


class Loaded(NamedTuple):
    """A pipeline ready to denoise, and what loading it did: the load half of the metrics.

    Built once by `load_pipeline`, then used by `generate` for one image (this file's run) or
    for every request (the team's generation service, which imports this module). A NamedTuple,
    not a dataclass: tools load this file by path without registering it in sys.modules."""

    pipe: StableDiffusion3Pipeline
    device: torch.device
    model: str
    weights: str
    text_encoders: str
    random_size: str | None
    fp8_requested: str
    fp8_applied: str
    fp8_fallback_reason: str | None
    compiled: bool
    compile_skipped_reason: str | None
    inductor_cache_dir: str | None
    started: float  # perf_counter at the start of loading
    load_s: float
    load_phases_s: dict[str, float]
    load_peak_mem_gib: float


def load_pipeline(args: argparse.Namespace) -> Loaded:
    """Build or load the pipeline of `args.model`, apply FP8, compile when asked and allowed."""
    t_start = time.perf_counter()
    watch = Stopwatch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fp8_applied, fallback_reason = resolve_fp8(args.fp8, device, args.strict)  # fail fast
    watch.lap("fp8_check")
    with untraced_by_debugpy():
        import_diffusers()
    watch.lap("imports")
    skipped = compile_skipped_reason(args) if fp8_applied == "dq" or args.compile else None
    compiled = (fp8_applied == "dq" or args.compile) and not skipped

    random_size = args.model if args.model in TRANSFORMER_CONFIGS else None
    what = f"building random-weight SD3.5-{random_size}" if random_size else f"loading {args.model}"
    how = "compiled blocks" if compiled else "eager"
    print(f"inference: {what} on {device}, --fp8 {fp8_applied}, {how}", file=sys.stderr)
    if skipped:
        print(f"inference: NOT COMPILING: {skipped}; the transformer runs eager", file=sys.stderr)
    if random_size:
        pipe = random_pipeline(random_size, device, args.seed)
        weights = f"random (seed {args.seed})"
    else:
        pipe = pretrained_pipeline(args.model, device)
        weights = "pretrained"
    transformer = pipe.transformer
    watch.lap("build" if random_size else "load")
    apply_fp8(transformer, fp8_applied)
    watch.lap("fp8")
    cache_dir = compile_blocks(transformer) if compiled else None
    text_encoders = "pretrained"
    if random_size in ("medium", "large"):
        text_encoders = "skipped (random prompt embeddings)"
    elif random_size == "tiny":
        text_encoders = "tiny random (2x CLIP + T5, character-level tokenizers)"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    watch.lap("ready")
    load_peak, _ = memory_peak_gib(device)
    return Loaded(
        pipe=pipe,
        device=device,
        model=args.model,
        weights=weights,
        text_encoders=text_encoders,
        random_size=random_size,
        fp8_requested=args.fp8,
        fp8_applied=fp8_applied,
        fp8_fallback_reason=fallback_reason,
        compiled=compiled,
        compile_skipped_reason=skipped,
        inductor_cache_dir=cache_dir,
        started=t_start,
        load_s=round(time.perf_counter() - t_start, 3),
        load_phases_s=watch.phases,
        load_peak_mem_gib=round(load_peak, 3),
    )


def generate(
    loaded: Loaded,
    *,
    prompt: str,
    height: int,
    width: int,
    steps: int,
    seed: int,
    guidance: float,
    negative_prompt: str | None = None,
) -> tuple[Image, dict[str, Any]]:
    """Denoise and decode one image with a loaded pipeline; the image and its metrics.

    The metrics are this file's JSON line less `attention_maps` and `output`; `total_s` is this
    image's time (denoise + decode). Random Medium/Large weights have no text encoders: their
    seeded random prompt embeddings stand in for prompt and negative prompt alike.
    """
    pipe, device = loaded.pipe, loaded.device
    transformer = pipe.transformer
    t_start = time.perf_counter()
    call: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt}
    if loaded.random_size in ("medium", "large"):
        call = random_prompt_embeds(transformer.config, device, seed)
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    _, peak_kind = memory_peak_gib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    timer = StepTimer(device)
    hook = transformer.register_forward_pre_hook(timer.on_transformer_call)
    t_denoise = time.perf_counter()
    try:
        with torch.inference_mode():
            latents = pipe(
                **call,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),  # CPU noise: same on any device
                output_type="latent",
                callback_on_step_end=timer.on_step_end,
            ).images
            denoise_s = timer.now() - t_denoise
            t_decode = time.perf_counter()
            image = decode(pipe, latents)
            decode_s = timer.now() - t_decode
    finally:
        hook.remove()  # a failed request must not leave its timer on the next one's calls

    durations = timer.durations()
    measured = durations[1:] if len(durations) > 1 else durations
    peak, _ = memory_peak_gib(device)
    weight_bytes = sum(map(tensor_bytes, (*transformer.parameters(), *transformer.buffers())))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return image, {
        "ok": True,
        "device": str(device),
        "gpu": gpu,
        "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "torchao": package_version("torchao"),
        "model": loaded.model,
        "weights": loaded.weights,
        "text_encoders": loaded.text_encoders,
        "fp8_requested": loaded.fp8_requested,
        "fp8_applied": loaded.fp8_applied,
        "fp8_fallback_reason": loaded.fp8_fallback_reason,
        "fp8_linear_layers": sum(is_fp8_weight(m.weight) for m in linears),
        "linear_layers": len(linears),
        "compiled": loaded.compiled,
        "compile_skipped_reason": loaded.compile_skipped_reason,
        "inductor_cache_dir": loaded.inductor_cache_dir,
        "seed": seed,
        "height": height,
        "width": width,
        "steps": steps,
        "guidance": guidance,
        "load_s": loaded.load_s,
        "load_phases_s": loaded.load_phases_s,
        "first_step_s": round(durations[0], 3) if durations else None,
        "step_ms_mean": round(1000 * sum(measured) / len(measured), 2) if measured else None,
        "step_ms_note": (
            f"mean over steps 2..N; step 1 (compilation, allocator warm-up) excluded; {timer.clock}"
            if len(durations) > 1
            else f"single step: includes warm-up; {timer.clock}"
        ),
        "denoise_s": round(denoise_s, 3),
        "decode_s": round(decode_s, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "peak_mem_gib": round(peak, 3),
        "peak_mem_kind": peak_kind + (" (generation)" if device.type == "cuda" else ""),
        "load_peak_mem_gib": loaded.load_peak_mem_gib,
        "transformer_weights_gib": round(weight_bytes / GIB, 4),
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "latents_shape": list(latents.shape),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build or load the pipeline, apply FP8, denoise, decode, save; return the metrics."""
    loaded = load_pipeline(args)
    recording = start_attention_maps(args, loaded.pipe.transformer)
    image, metrics = generate(
        loaded,
        prompt=args.prompt,
        height=args.height,
        width=args.width,
        steps=args.steps,
        seed=args.seed,
        guidance=args.guidance,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output)
    attention = save_attention_maps(args, loaded.pipe, recording, image) if recording else None
    # From the start of loading, as before the service shared generate(): one run, one total.
    metrics["total_s"] = round(time.perf_counter() - loaded.started, 3)
    return {**metrics, "attention_maps": attention, "output": str(args.output)}


@contextlib.contextmanager
def stdout_reserved() -> Iterator[Any]:
    """Send everything written to fd 1 (Python, C extensions, compile workers) to stderr.

    Yields a writer for the real stdout, so the metrics line is the only thing a caller
    parsing stdout ever sees.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout = os.fdopen(saved, "w", closefd=True)
    try:
        yield real_stdout
    finally:
        sys.stdout.flush()
        real_stdout.flush()
        os.dup2(real_stdout.fileno(), 1)
        real_stdout.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output = Path(args.output)
    with stdout_reserved() as out:
        try:
            metrics = run(args)
        except InferenceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, StrictRefusal) else 1
        line = json.dumps(metrics)
        if args.metrics:
            args.metrics.parent.mkdir(parents=True, exist_ok=True)
            args.metrics.write_text(line + "\n")
        print(line, file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
