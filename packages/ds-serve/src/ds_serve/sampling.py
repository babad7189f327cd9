"""The server samples with ds-model's sampler (``ds_model.sampling``); re-exported here."""

from ds_model.sampling import Sampled, SamplingParams, sample

__all__ = ["Sampled", "SamplingParams", "sample"]
