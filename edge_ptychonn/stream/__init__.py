"""The live path of one consumer: settings, frame decoding and encoding,
preprocessing, batching and the inference pipeline.

Nothing here imports torch, the simulator or the tools: a consumer loads only
this package, its engine and PvaPy.
"""
