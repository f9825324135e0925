"""SD3.5's architectures, as published with the weights, and a tiny one of the same structure.

Plain data (diffusers' SD3Transformer2DModel and AutoencoderKL keyword arguments): what
`--model tiny|medium|large` builds with random weights.
"""

from __future__ import annotations

from typing import Any

CLIP_TOKENS = 77  # CLIP context length; SD3 prompt embeddings are CLIP tokens + T5 tokens
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length

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
