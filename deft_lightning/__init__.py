"""deft-lightning: SFT of LitGPT models with DEFT and other token-level objectives."""

__version__ = "0.1.0"
