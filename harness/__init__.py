"""Orchestration of quantization studies: models, data, the layer-by-layer pipeline,
evaluations, records. The algorithms themselves live in :mod:`quantizers`."""
