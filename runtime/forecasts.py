"""Forecasts of the whole transformer output at a skipped call, and the Euler correction of the latent.

The residual forecasts (``reuse``, ``linear``) act inside the transformer: a skipped call adds a residual to the
block stack's input and the model's own head still runs. The output forecasts act on what the transformer
returns (the velocity, for flow-matching models), per CFG branch:

- ``output_linear``: a skipped call returns the line through the branch's last two computed outputs, by step
  index, evaluated at this step (the last computed output until there are two);
- ``output_corrected``: the same, and the next computed call repairs the latent. After computed step ``a``,
  skipped steps ``a+1 .. k-1`` and computed step ``k``, the skipped outputs are re-estimated on the line from
  ``v_a`` to ``v_k`` (an interpolation now that ``v_k`` is known) and step ``k``'s output carries what the
  latent missed: ``v_k + sum_j dsigma_j (v~_j - v^_j) / dsigma_k``, ``v^_j`` the forecast a skipped call
  returned, ``v~_j`` its re-estimate, ``dsigma_j = sigma_{j+1} - sigma_j``. An Euler step
  ``x_{j+1} = x_j + dsigma_j v_j`` then lands where the re-estimated outputs would have taken it. That holds for
  diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic) alone, through any linear CFG combination;
  a pipeline's norm rescale of the combined output makes it approximate. Multistep samplers (Wan's UniPC)
  reuse past outputs in their update, so the correction is refused there.

The state of one branch is an :class:`OutputHistory`; :func:`sample_of` and :func:`with_sample` read and replace
the output tensor of what a transformer returns (a tuple or a ``Transformer2DModelOutput``; a sample given as a
list of per-item tensors, as Z-Image returns it, is stacked, and given back as a list).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .errors import ConfigError, TeaCacheError

#: The forecasts that replace the transformer's output rather than the block stack's residual.
OUTPUT_FORECASTS = ("output_linear", "output_corrected")

SigmaStep = Callable[[], torch.Tensor]  # sigma_{i+1} - sigma_i of the scheduler's current step i, 0-d, float32


def euler_sigma_step(scheduler: Any) -> SigmaStep | None:
    """A function giving the current step's ``sigma_{i+1} - sigma_i`` as a 0-d float32 tensor where the scheduler
    keeps its sigmas (the pipeline's device: no host read), or None when ``scheduler`` is not a deterministic
    ``FlowMatchEulerDiscreteScheduler`` (the only sampler the correction is exact for)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or getattr(scheduler.config, "stochastic_sampling", False):
        return None

    def step() -> torch.Tensor:
        index = scheduler.step_index
        if index is None:  # before the first scheduler.step of a generation
            index = scheduler.begin_index if scheduler.begin_index is not None else 0
        sigmas = scheduler.sigmas
        return (sigmas[index + 1] - sigmas[index]).float()

    return step


def forecasts_for(scheduler: Any) -> tuple[str, ...]:
    """Every forecast the runtime can run with ``scheduler`` (``output_corrected`` only with Euler)."""
    from .settings import FORECASTS

    return tuple(f for f in FORECASTS if f != "output_corrected" or euler_sigma_step(scheduler) is not None)


def refuse_correction(scheduler: Any, where: str) -> ConfigError:
    sampler = "no scheduler (a bare transformer)" if scheduler is None else f"a {type(scheduler).__name__}"
    return ConfigError(
        f"{where}: forecast output_corrected repairs the latent of a FlowMatchEulerDiscreteScheduler step, but the "
        f"cache has {sampler}; apply the cache to a pipeline with that scheduler, or use forecast=output_linear."
    )


def _raw_sample(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return getattr(output, "sample", None)


def sample_of(output: Any) -> torch.Tensor:
    """The output tensor of what a diffusers transformer returns (``(sample, ...)`` or ``.sample``); a sample
    given as a list of equally shaped tensors, one per batch item (Z-Image), stacked into one."""
    sample = _raw_sample(output)
    if isinstance(sample, torch.Tensor):
        return sample
    if (isinstance(sample, (list, tuple)) and sample and all(isinstance(t, torch.Tensor) for t in sample)
            and len({t.shape for t in sample}) == 1):
        return torch.stack(list(sample))
    raise TeaCacheError(
        f"the output forecasts need the transformer's output tensor, but its forward returned a "
        f"{type(output).__name__} without one (or a list of differently shaped ones); use forecast=reuse or linear "
        "for this model."
    )


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its output tensor replaced by ``sample`` (same container type; a list sample stays a list)."""
    if isinstance(_raw_sample(output), (list, tuple)):
        sample = type(_raw_sample(output))(sample.unbind(0))
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)):
        return type(output)([sample, *output[1:]])
    return dataclasses.replace(output, sample=sample) if dataclasses.is_dataclass(output) else type(output)(sample=sample)


class OutputHistory:
    """One branch's computed outputs (the last two, as computed) and, for ``output_corrected``, what the skipped
    calls since the last computed one returned, folded into three float32 sums (on the outputs' device) so no
    skipped output is kept and nothing is read to the host."""

    def __init__(self) -> None:
        self.outputs: list[tuple[int, torch.Tensor]] = []  # (step, output as the model computed it), oldest first
        self.skipped_sum: torch.Tensor | None = None  # sum_j dsigma_j v^_j over the skipped calls since outputs[-1]
        self.dsigma_sum: torch.Tensor | float = 0.0  # sum_j dsigma_j
        self.dsigma_moment: torch.Tensor | float = 0.0  # sum_j dsigma_j (j - a)

    def forecast(self, step: int, sigma_step: SigmaStep | None) -> torch.Tensor | None:
        """The output a skipped call at ``step`` returns (None: nothing computed yet); with ``sigma_step``
        (output_corrected) it is also folded into the sums the next computed call corrects with."""
        if not self.outputs:
            return None
        a, v_a = self.outputs[-1]
        if len(self.outputs) >= 2:
            b, v_b = self.outputs[-2]
            value = v_a + (v_a - v_b) * ((step - a) / (a - b))
        else:
            value = v_a
        if sigma_step is not None:
            dsigma = sigma_step().to(value.device)
            term = value.float() * dsigma
            self.skipped_sum = term if self.skipped_sum is None else self.skipped_sum + term
            self.dsigma_sum = self.dsigma_sum + dsigma
            self.dsigma_moment = self.dsigma_moment + dsigma * (step - a)
        return value

    def computed(self, step: int, output: torch.Tensor, sigma_step: SigmaStep | None) -> torch.Tensor:
        """Keep a computed call's output; returns the output the call should return (corrected when
        ``sigma_step`` is given and skipped calls came before it)."""
        if self.outputs and self.outputs[-1][1].shape != output.shape:
            self.__init__()  # a new resolution: nothing before it applies
        result = output
        if sigma_step is not None and self.skipped_sum is not None and self.outputs:
            # (a sampler step with sigma_{k+1} == sigma_k moves nothing and cannot carry a correction: the schedules
            # diffusers makes never have one)
            a, v_a = self.outputs[-1]
            here = sigma_step().to(output.device)
            v_a, v_k = v_a.float(), output.float()
            redone = v_a * self.dsigma_sum + (v_k - v_a) * (self.dsigma_moment / (step - a))
            result = (v_k + (redone - self.skipped_sum) / here).to(output.dtype)
        self.outputs = [*self.outputs[-1:], (step, output.detach().clone())]
        self.skipped_sum, self.dsigma_sum, self.dsigma_moment = None, 0.0, 0.0
        return result
