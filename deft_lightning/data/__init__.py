"""Data: the SFT DataModule (data/module.py) and the sources it reads (data/sources.py)."""

from deft_lightning.data.module import SFTDataModule
from deft_lightning.data.sources import (
    FigFontSource,
    FileSource,
    HubSource,
    MixtureSource,
    ReasoningGymMathSource,
    SelfDistilledSource,
    Source,
)

__all__ = [
    "FigFontSource",
    "FileSource",
    "HubSource",
    "MixtureSource",
    "ReasoningGymMathSource",
    "SFTDataModule",
    "SelfDistilledSource",
    "Source",
]
