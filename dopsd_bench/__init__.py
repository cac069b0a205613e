"""dopsd-bench: benchmark suite and training harness for continuously tuning step-distilled diffusion models."""

__version__ = "0.1.0"
