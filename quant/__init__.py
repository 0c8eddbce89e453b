"""Quantized expert tiers: requantization (HQQ), the tier store, and expert-FFN kernels.

See quant/README.md for the formats and the measurements behind the choices.
"""
