"""avr-megatron: Alignment via Refinement (AvR) on Megatron-Core."""

__version__ = "0.1.0"
