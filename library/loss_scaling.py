"""The optimizer step under fp16 loss scaling (`--mixed_precision fp16` on a GPU).

With fp16, accelerate (1.x, Accelerator.__init__) makes a `torch.amp.GradScaler`: `accelerator.backward` scales
the loss, `accelerator.clip_grad_norm_` unscales the prepared optimizer's gradients before clipping, and the
prepared optimizer's `step` runs `scaler.step` (which skips the update when a gradient is inf/NaN) and then
`scaler.update()` (which halves the scale after such a step). Two things around that step are ours:

* The learning-rate schedule must not advance on a skipped step (accelerate's AcceleratedScheduler.step returns
  early then; KS prepares its scheduler, so KS behaves this way). We do not prepare the scheduler (accelerate would
  step it once per process), so the loop asks `optimizer_step` whether the update happened. accelerate's own flag
  (`optimizer_step_was_skipped`) is set only when the optimizer's `step` was never called, but for fused
  optimizers (`--optimizer_args fused=True`) GradScaler always calls `step` and the fused kernel skips the update
  itself (huggingface/accelerate#4242, open; its fix #4243 reads the scale the same way): the scale is the
  reliable witness, since `update()` lowers it exactly when an inf/NaN was found.
* u(σ) of `--loss_weighting learned` has its own Adam, and its gradients carry the same loss scale. GradScaler
  handles several optimizers (https://pytorch.org/docs/stable/notes/amp_examples.html, "Working with Multiple
  Models, Losses, and Optimizers"): `LearnedWeighting.step(scaler)` steps it through `scaler.step`, which unscales
  its gradients and skips it on inf; the loop calls it before `optimizer_step`, whose `update()` closes the step.
"""
from __future__ import annotations


def optimizer_step(accelerator, optimizer) -> bool:
    """Step the prepared `optimizer`; True when its update was applied (always, without a GradScaler). With a
    scaler this reads the scale before and after (two host syncs; GradScaler's step already syncs once)."""
    scaler = accelerator.scaler
    if scaler is None:
        optimizer.step()
        return True
    scale_before = scaler.get_scale()
    optimizer.step()
    return scaler.get_scale() >= scale_before
