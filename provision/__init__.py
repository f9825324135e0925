"""provision: a fresh GPU server → a ready SD3.5 FP8 team workstation, over SSH, proven."""

__version__ = "0.1.0"
