"""Pipelines: the model families' seams and the families themselves: the `Policy` a family fills
in (`policy`), the `Denoiser` every network is wrapped in (`denoiser`), the diffusers families
SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1 (`sd`) and the built-in digits family (`digits`).

Layering (docs/architecture.md, checked by tests/test_architecture.py): may import tasks/,
models/, numerics/ and the config modules; rewards/, algorithms/, ctrl/ and trainer/ build on it.
"""
