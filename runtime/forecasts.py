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
  ``x_{j+1} = x_j + dsigma_j v_j`` then lands where the re-estimated outputs would have taken it
  (diffusers' ``FlowMatchEulerDiscreteScheduler``, deterministic).

  A multistep sampler (``UniPCMultistepScheduler``, Wan's; ``DPMSolverMultistepScheduler``, Sana's; DEIS, and
  DPM-Solver's singlestep form, whose later stages reuse the stage's first output) keeps using past outputs, the forecasts among them,
  so no one-gap formula lands it. Its step is still linear, with coefficients set by the schedule alone: the
  latent step ``k`` returns is ``w0_k x_0 + sum_i W[k, i] m_i`` over the outputs ``m_i`` it was given.
  :class:`SamplerWeights` finds ``W`` by running a copy of the scheduler on one-hot outputs (and checks it on
  random ones). Every computed call ``k`` then returns ``v_k + c_k``, with ``c_k`` chosen so that the latent
  step ``k`` returns equals the one the re-estimated outputs (and the corrections so far) give, counting every
  gap of the generation. The cost: one latent-sized float32 tensor per gap, kept until the generation ends.

  Both hold through any linear CFG combination; a pipeline's norm rescale of the combined output makes them
  approximate. Other samplers (stochastic ones, thresholding) are refused.

The state of one branch is an :class:`OutputHistory`; :func:`sample_of` and :func:`with_sample` read and replace
the output tensor of what a transformer returns (a tuple or a ``Transformer2DModelOutput``; a sample given as a
list of per-item tensors, as Z-Image returns it, is stacked, and given back as a list).
"""

from __future__ import annotations

import copy
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


def lands_multistep(scheduler: Any) -> bool:
    """Whether ``output_corrected`` lands ``scheduler`` through its probed weights: a ``UniPCMultistepScheduler``
    (Wan's), a ``DEISMultistepScheduler``, or a deterministic ``DPMSolverMultistepScheduler`` or
    ``DPMSolverSinglestepScheduler`` (``dpmsolver`` or ``dpmsolver++``; the multistep one is Sana's and PixArt's), without
    thresholding or a learned variance (an output with twice the latent's channels)."""
    from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler

    dpm = (DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler)
    if not isinstance(scheduler, (UniPCMultistepScheduler, DEISMultistepScheduler, *dpm)) or scheduler.config.thresholding:
        return False
    if isinstance(scheduler, dpm):
        return scheduler.config.algorithm_type in ("dpmsolver", "dpmsolver++") and scheduler.config.variance_type is None
    return True


def corrects(scheduler: Any) -> bool:
    """Whether ``output_corrected`` can run with ``scheduler``."""
    return euler_sigma_step(scheduler) is not None or lands_multistep(scheduler)


def forecasts_for(scheduler: Any) -> tuple[str, ...]:
    """Every forecast the runtime can run with ``scheduler`` (``output_corrected`` with Euler, UniPC, DEIS or DPM-Solver)."""
    from .settings import FORECASTS

    return tuple(f for f in FORECASTS if f != "output_corrected" or corrects(scheduler))


#: the samplers output_corrected lands, for messages
CORRECTED_SAMPLERS = (
    "a FlowMatchEulerDiscreteScheduler (deterministic), a UniPCMultistepScheduler, a DEISMultistepScheduler, or a "
    "DPMSolverMultistepScheduler or DPMSolverSinglestepScheduler (dpmsolver or dpmsolver++), none with thresholding"
)


def refuse_correction(scheduler: Any, where: str) -> ConfigError:
    sampler = "no scheduler (a bare transformer)" if scheduler is None else f"a {type(scheduler).__name__}"
    return ConfigError(
        f"{where}: forecast output_corrected repairs the latent of {CORRECTED_SAMPLERS}, but the cache has "
        f"{sampler}; apply the cache to a pipeline with such a scheduler, or use forecast=output_linear."
    )


def probe_weights(scheduler: Any, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w0, W)`` of the generation that starts at step index ``start`` of ``scheduler``'s timesteps: the latent
    step ``k`` returns is ``w0[k] x_0 + sum_i W[k, i] m_i`` (float64, on the CPU). Runs a copy of the scheduler
    (through its class's ``step``: the runtime wraps the instance's) on one-hot outputs, then checks the result on
    random ones; a sampler whose step is not linear in them is refused."""
    n = len(scheduler.timesteps) - start

    def run(sample: torch.Tensor, outputs: Callable[[int], torch.Tensor]) -> torch.Tensor:
        probe = copy.deepcopy(scheduler)
        probe._step_index = None
        probe.set_begin_index(start)
        latents = []
        for k in range(n):
            sample = type(probe).step(probe, outputs(k), probe.timesteps[start + k], sample, return_dict=False)[0]
            latents.append(sample)
        return torch.stack(latents)

    basis = torch.eye(n + 1, dtype=torch.float64)
    latents = run(basis[:1].clone(), lambda k: basis[k + 1 : k + 2])[:, 0]  # [k, 1 + i]
    w0, weights = latents[:, 0], latents[:, 1:]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, dtype=torch.float64, generator=generator)
    m = torch.randn(n, 1, 4, dtype=torch.float64, generator=generator)
    got = run(x.clone(), lambda k: m[k])
    expected = w0[:, None, None] * x + torch.einsum("ki,ibc->kbc", weights, m)
    # (DPM-Solver computes in float32 whatever it is given: rounding differs from float64 by ~1e-7; a sampler that
    # adds noise or clips is off by far more)
    if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise TeaCacheError(
            f"forecast output_corrected needs a sampler step that is linear in the model output, but this "
            f"{type(scheduler).__name__}'s is not (its result differs from the probed weights by "
            f"{float((got - expected).abs().max()):.2e}); use forecast=output_linear with it."
        )
    return w0, weights


class SamplerWeights:
    """``W`` (:func:`probe_weights`) of a multistep sampler for each schedule it runs, float32 on the outputs'
    device, the last ``keep`` kept. Found again only when the sigmas change: they are compared with
    ``torch.equal`` where the scheduler keeps them, on the CPU, so no device is read."""

    def __init__(self, scheduler: Any, keep: int = 8) -> None:
        self.scheduler = scheduler
        self.keep = keep
        self._found: list[tuple[torch.Tensor, int, torch.device, torch.Tensor]] = []  # (sigmas, start, device, W)

    def at_start(self, device: torch.device) -> torch.Tensor:
        """``W`` of the generation about to run: call it before the scheduler's first step of the generation."""
        s = self.scheduler
        if s.step_index is not None:
            raise TeaCacheError(
                f"output_corrected: this transformer's first call of a generation came after the "
                f"{type(s).__name__} had run {s.step_index} step(s), so its multistep weights cannot be found (a "
                "second expert, as in Wan 2.2, starts mid-way); apply the cache to the pipeline, whose experts then "
                "share each branch's history, or use forecast=output_linear."
            )
        start = s.begin_index if s.begin_index is not None else 0
        sigmas = s.sigmas
        for known, begin, where, weights in self._found:
            if begin == start and where == device and known.shape == sigmas.shape and torch.equal(known, sigmas):
                return weights
        weights = probe_weights(s, start)[1].to(device=device, dtype=torch.float32)
        self._found = [*self._found[-(self.keep - 1):], (sigmas.clone(), start, device, weights)]
        return weights


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


class BranchHistories:
    """The :class:`OutputHistory` of each CFG branch, shared by the experts of one pipeline (Wan 2.2's
    ``transformer`` and ``transformer_2``): a branch's latent runs through both, so its forecasts, and the
    correction of what they cost, follow it across the switch (a multistep sampler's step after the switch still
    weighs outputs from before it). Steps are the generation's, not an expert's."""

    def __init__(self) -> None:
        self._by_branch: dict[str, OutputHistory] = {}

    def at(self, branch: str, step: int) -> "OutputHistory":
        """``branch``'s history at the generation's ``step`` (a fresh one at step 0: a new generation)."""
        if step == 0 or branch not in self._by_branch:
            self._by_branch[branch] = OutputHistory()
        return self._by_branch[branch]

    def reset(self) -> None:
        self._by_branch.clear()


class OutputHistory:
    """One branch's computed outputs (the last two, as computed) and, for ``output_corrected``, what the
    correction needs, on the outputs' device with nothing read to the host: with Euler, what the skipped calls
    since the last computed one returned, folded into three float32 sums (no skipped output is kept); with a
    multistep sampler (``weights`` set for the generation), one tensor per gap (:meth:`computed`).

    Shared by two experts (:class:`BranchHistories`), the forecast extrapolates only through two outputs of the
    same model (``source``): past the switch it holds the new expert's first output until it has two, since the
    experts' outputs need not line up. The re-estimate of a gap is an interpolation, across the switch as well."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        self.weights = weights  # a multistep sampler's W for this generation (SamplerWeights.at_start)
        self.gaps: list[tuple[torch.Tensor, torch.Tensor]] = []  # multistep: (g, u) per gap, see _land
        self.outputs: list[tuple[int, torch.Tensor]] = []  # (step, output as the model computed it), oldest first
        self.sloped = False  # whether the forecast extrapolates through outputs[-2] (both from one source)
        self._source: Any = None  # what computed outputs[-1]
        self.skipped_sum: torch.Tensor | None = None  # sum_j dsigma_j v^_j over the skipped calls since outputs[-1]
        self.dsigma_sum: torch.Tensor | float = 0.0  # sum_j dsigma_j
        self.dsigma_moment: torch.Tensor | float = 0.0  # sum_j dsigma_j (j - a)

    def forecast(self, step: int, sigma_step: SigmaStep | None) -> torch.Tensor | None:
        """The output a skipped call at ``step`` returns (None: nothing computed yet); with ``sigma_step``
        (output_corrected) it is also folded into the sums the next computed call corrects with."""
        if not self.outputs:
            return None
        a, v_a = self.outputs[-1]
        if self.sloped:
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

    def computed(self, step: int, output: torch.Tensor, sigma_step: SigmaStep | None, source: Any = None) -> torch.Tensor:
        """Keep a computed call's output (made by ``source``: an expert); returns the output the call should return
        (corrected when ``sigma_step`` (Euler) or ``weights`` (multistep) is given and skipped calls came before it)."""
        if self.outputs and self.outputs[-1][1].shape != output.shape:
            self.__init__(self.weights)  # a new resolution: nothing before it applies
        result = output
        if self.weights is not None and self.outputs:
            result = self._land(step, output)
        elif sigma_step is not None and self.skipped_sum is not None and self.outputs:
            # (a sampler step with sigma_{k+1} == sigma_k moves nothing and cannot carry a correction: the schedules
            # diffusers makes never have one)
            a, v_a = self.outputs[-1]
            here = sigma_step().to(output.device)
            v_a, v_k = v_a.float(), output.float()
            redone = v_a * self.dsigma_sum + (v_k - v_a) * (self.dsigma_moment / (step - a))
            result = (v_k + (redone - self.skipped_sum) / here).to(output.dtype)
        self.sloped = bool(self.outputs) and source == self._source
        self.outputs = [*self.outputs[-1:], (step, output.detach().clone())]
        self._source = source
        self.skipped_sum, self.dsigma_sum, self.dsigma_moment = None, 0.0, 0.0
        return result

    def _land(self, step: int, output: torch.Tensor) -> torch.Tensor:
        """The multistep correction at computed step ``k = step``. Write ``e_i`` for how far the output the sampler
        got at step ``i`` is from the target: ``v~_j`` at a skipped step, the computed output at a computed one.
        After computed ``a`` (and ``b`` before it), skipped ``a+1 .. k-1`` and computed ``k``, the gap's errors are
        ``e_j = v^_j - v~_j = -(j - a) g``, ``g = (v_k - v_a) / (k - a) - (v_a - v_b) / (a - b)`` (without the second
        term when the forecast had ``v_a`` alone). So every error of the generation is ``e_i = sum_l U[l, i] g_l``
        over its gaps ``l``, and the latent step ``k`` returns is off by ``sum_l (W[k] . U[l]) g_l`` plus
        ``W[k, k] c_k``. ``c_k = sum_l coef_l g_l`` with ``coef_l = -(W[k] . U[l]) / W[k, k]`` cancels every term;
        ``U[l, k] = coef_l`` records it for the steps after."""
        weights = self.weights
        if step >= weights.shape[0]:
            raise TeaCacheError(
                f"output_corrected: transformer call {step + 1} of a generation whose sampler runs {weights.shape[0]} "
                "steps; call the pipeline, which sets the scheduler's timesteps before its first step."
            )
        a, v_a = self.outputs[-1]
        if step - a > 1:  # a gap ended here
            v_k, v_a = output.float(), v_a.float()
            g = (v_k - v_a) / (step - a)
            if self.sloped:  # the gap's forecasts extrapolated through v_b
                b, v_b = self.outputs[-2]
                g = g - (v_a - v_b.float()) / (a - b)
            u = torch.zeros(weights.shape[1], device=weights.device, dtype=weights.dtype)
            u[a + 1 : step] = -torch.arange(1, step - a, device=weights.device, dtype=weights.dtype)
            self.gaps.append((g, u))
        if not self.gaps:
            return output
        row, here = weights[step], weights[step, step]
        correction: torch.Tensor | None = None
        for g, u in self.gaps:
            coef = torch.where(here != 0, -(row @ u) / here, torch.zeros_like(here))
            u[step] = coef
            term = g * coef.to(g.device)
            correction = term if correction is None else correction + term
        return (output.float() + correction).to(output.dtype)
