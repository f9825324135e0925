"""The pipeline `--model` names: SD3.5 weights from the HF cache, or an architecture built with
seeded random weights.

An HF id or local path loads from the HF cache (never downloads under HF_HUB_OFFLINE=1), each
safetensors file straight onto the GPU. `tiny`, `medium` and `large` build that architecture
(`configs`) with random weights, offline, seeded by `--seed`, so every FP8 mode of one seed
starts from the same weights: allocated on the GPU uninitialised (no default init to throw
away) and initialised in place. For `medium`/`large` the full-size text encoders (T5-XXL
alone is 4.7 B parameters) are not built and seeded random prompt embeddings of the right
shapes are passed instead; `tiny` builds tiny but real CLIP/T5 encoders and tokenizers so the
whole pipeline path runs on a CPU in seconds.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from sd35 import InferenceError
from sd35.configs import CLIP_TOKENS, SD3_VAE, SD35_TINY, T5_TOKENS, TINY_VAE, TRANSFORMER_CONFIGS

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

DTYPE = torch.bfloat16
TEXT_COMPONENTS = (
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)


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


def text_encoders(random_size: str | None) -> str:
    """What encodes the prompt for this model, in words, for the metrics."""
    if random_size in ("medium", "large"):
        return "skipped (random prompt embeddings)"
    if random_size == "tiny":
        return "tiny random (2x CLIP + T5, character-level tokenizers)"
    return "pretrained"


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


def random_step_inputs(transformer: Any, device: torch.device, embeds_seed: int,
                       latents_seed: int) -> dict[str, torch.Tensor]:
    """One denoising step's transformer inputs with guidance ([negative, prompt]): seeded random
    latents at the model's sample size and `random_prompt_embeds`. What the benches time a
    transformer call on (bench/fp8_kernels.py, bench/gpu_container/eager_step.py)."""
    embeds = random_prompt_embeds(transformer.config, device, embeds_seed)
    side = transformer.config.sample_size  # latents of a 1024² image for Large
    g = torch.Generator().manual_seed(latents_seed)
    return {
        "hidden_states": torch.randn(2, 16, side, side, generator=g).to(device, DTYPE),
        "encoder_hidden_states": torch.cat([embeds["negative_prompt_embeds"],
                                            embeds["prompt_embeds"]]),
        "pooled_projections": torch.cat([embeds["negative_pooled_prompt_embeds"],
                                         embeds["pooled_prompt_embeds"]]),
        "timestep": torch.full((2,), 500.0, device=device),
    }
