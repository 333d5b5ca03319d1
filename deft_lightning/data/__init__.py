"""Data: DataModules and sources."""

from deft_lightning.data.sft import SFTJsonData, read_sft_jsonl

__all__ = ["SFTJsonData", "read_sft_jsonl"]
