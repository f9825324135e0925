"""The machinery of `inference.py`, beside it so that file reads as the generation a member
debugs (arguments, load, denoise, decode, save) and this holds the rest, one concern a module:

  debugger   who is tracing this process; library imports untraced under debugpy
  fp8        which FP8 mode can run here, and the transformer converted to it
  compiling  whether to compile, the compiled blocks and their two kernel changes
  flash_attention  FlashAttention-3 for the compiled blocks' attention on Hopper
  configs    SD3.5's published architectures (transformer, VAE, prompt lengths)
  pipelines  the pipeline: random weights built on the device, or pretrained from the cache
  attention  `--attention-maps`: the blocks and step hooked, the PNGs written
  metrics    timers, memory peaks, the JSON line and the stdout it owns

It goes wherever inference.py goes (the workspace, `provision verify`'s run, the generation
service), and like it imports nothing from `provision`. inference.py imports it with
debugpy's tracing off, as it does torch (`debugger.untraced_by_debugpy`): breakpoints in
these functions fire, ones on their module-level lines do not.
"""


class InferenceError(Exception):
    """A known failure: reported as one line on stderr, no traceback."""


class StrictRefusal(InferenceError):
    """`--strict` and the requested FP8 mode cannot run here."""
