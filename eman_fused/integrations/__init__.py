"""Adapters for the frameworks users already train with, each an optional extra:

- eman_fused.integrations.lightning (`pip install eman_fused[lightning]`): a Lightning Callback
  that keeps an EMATeacher (one fused update per optimizer step, in the checkpoint, an exact
  EMA weight swap for validation/test/predict).
- eman_fused.integrations.diffusers (`pip install eman_fused[diffusers]`): diffusers'
  EMAModel API with one fused launch per step.

`import eman_fused` imports neither; each imports its framework only when used.
"""
