"""Methods as recipes: ordered compositions of small passes, in the spirit of optax's chains.

A *pass* is built by a factory that binds its config (`mse_weights(num_candidates=100)`), and is then a
pure function `QModel, CalibData -> QModel`: it may rewrite parameters equivalently (smoothing, low-rank
splits), change the plan (mixed precision, input splits), fill the quantization state (scales, tables,
rounding variables, LoRA) or attach a sampler correction. A *recipe* is rules + passes + defaults, and the
registry maps method names to recipe builders so that a benchmark picks up every registered method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn

from dqjax.calib.data import CalibData
from dqjax.transform import apply as qapply
from dqjax.transform.discover import discover
from dqjax.transform.rules import Plan, Rule, make_plan
from dqjax.transform.state import QState, empty_qstate


@dataclasses.dataclass(frozen=True)
class SamplerCorrection:
  """A correction applied by the sampler to the quantized model's ε at every step (PTQD, D²-DPM, TaC, QNCD).

  `fn(state, eps, info) -> (eps, noise_var_delta)` is a static function (registered by name for
  checkpoints); `state` is its pytree of arrays (per-step tables). See `dqjax.diffusion.samplers.StepInfo`.
  """
  name: str
  fn: Callable
  state: Any

  def __post_init__(self):
    # Remember the function by name so a checkpoint (which stores name + state) can rebuild it.
    _CORRECTION_FNS.setdefault(self.name, self.fn)

  def __call__(self, eps, info):
    return self.fn(self.state, eps, info)


_CORRECTION_FNS: dict[str, Callable] = {}


def correction_from_checkpoint(name: str, state: Any) -> SamplerCorrection:
  """Rebuild a saved sampler correction (the method modules register their functions when they build one;
  importing them all makes every name known)."""
  _load_all()
  if name not in _CORRECTION_FNS:
    raise ValueError(f"sampler correction {name!r} is unknown; known: {', '.join(sorted(_CORRECTION_FNS))}")
  return SamplerCorrection(name, _CORRECTION_FNS[name], state)


def chain_corrections(corrections: Sequence[SamplerCorrection]) -> Optional[Callable]:
  """One sampler hook applying corrections in order (variance deltas add up)."""
  if not corrections:
    return None

  def hook(eps, info):
    total = 0.0
    for c in corrections:
      eps, dv = c(eps, info)
      total = total + dv
    return eps, total

  return hook


@dataclasses.dataclass(frozen=True)
class DiffusionEnv:
  """What a pass needs to know about the diffusion process beyond the calibration set: methods that
  compare FP and quantized trajectories (PTQD, D²-DPM, TaC), train (TDQ, QAT, LoRA) or draw fresh
  samples use it. Built by the zoo/bench from a model's card."""
  schedule: Any                                   # dqjax.diffusion.schedules.NoiseSchedule
  sampler: Any                                    # dqjax.diffusion.samplers.SamplerConfig
  sample_shape: tuple                             # per-sample model input shape (H, W, C)
  cond_sampler: Optional[Callable] = None         # (key, n) -> conditioning for n samples, or None
  null_cond: Any = None                           # the CFG null conditioning (one sample's worth)
  guidance_scale: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class QModel:
  """A model being quantized: static parts (model, plan) and arrays (params, qstate, FP reference).

  `params` are the (possibly equivalently rewritten) parameters the quantized model runs with;
  `fp_params` the untouched float parameters (teacher / reference for paired comparisons).
  """
  model: nn.Module
  plan: Plan
  params: Any
  qstate: QState
  fp_params: Any
  num_train_timesteps: int = 1000
  corrections: tuple[SamplerCorrection, ...] = ()
  meta: dict = dataclasses.field(default_factory=dict)
  env: Optional[DiffusionEnv] = None

  def replace(self, **changes) -> "QModel":
    return dataclasses.replace(self, **changes)

  def apply(self, x, t, cond=None, *, mode: str = "simulate", **kw):
    params = self.fp_params if mode == "fp" else self.params
    return qapply.quantized_apply(self.model, self.plan, params, self.qstate, x, t, cond, t=t, mode=mode,
                                  **kw)

  def denoiser(self, mode: str = "simulate", **kw) -> Callable:
    """`denoise(x, t, cond)` for the samplers."""
    if mode == "fp":
      return lambda x, t, cond=None: self.model.apply({"params": self.fp_params}, x, t, cond)
    return qapply.denoiser(self.model, self.plan, self.params, self.qstate, mode=mode, **kw)

  @property
  def correction(self) -> Optional[Callable]:
    return chain_corrections(self.corrections)


Pass = Callable[[QModel, CalibData], QModel]


def chain(*passes: Pass) -> Pass:
  """Compose passes left to right."""

  def run(qm: QModel, data: CalibData) -> QModel:
    for p in passes:
      qm = p(qm, data)
    return qm

  return run


def prepare(model: nn.Module, params: Any, rules: Sequence[Rule], example_args: Sequence[Any], *,
            num_train_timesteps: int = 1000, warn_unused: bool = True) -> QModel:
  """Discover ops, resolve rules and return an uncalibrated QModel."""
  ops = discover(model, {"params": params}, *example_args)
  plan = make_plan(ops, rules, warn_unused=warn_unused)
  return QModel(model, plan, params, empty_qstate(plan), params, num_train_timesteps)


# --- recipes and the registry ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
  """A method: how to build rules for a bit setting and which passes calibrate it.

  rules: (w_bits, a_bits, model_family) -> rules.
  passes: the pass chain (already bound to its config).
  """
  name: str
  family: str
  rules: Callable[..., Sequence[Rule]]
  passes: Pass
  description: str = ""

  def __call__(self, model: nn.Module, params: Any, example_args, data: CalibData, *, w_bits: int,
               a_bits: int, model_family: str = "unet", num_train_timesteps: int = 1000,
               env: Optional[DiffusionEnv] = None) -> QModel:
    qm = prepare(model, params, self.rules(w_bits, a_bits, model_family), example_args,
                 num_train_timesteps=num_train_timesteps, warn_unused=False)
    qm = qm.replace(env=env)
    qm = qm.replace(meta={**qm.meta, "method": self.name, "w_bits": w_bits, "a_bits": a_bits,
                          "model_family": model_family})
    return self.passes(qm, data)


FORWARD_KINDS = ("QModel", "ExtQModel", "QATModel")


def forward_kind(qm: QModel) -> str:
  """Which quantized forward a QModel runs: the core's ('QModel'), the activation-extras one of the
  correction/text methods ('ExtQModel') or the extended QAT one ('QATModel'). Saved with checkpoints so
  that a restored model quantizes the same way."""
  kind = type(qm).__name__
  if kind not in FORWARD_KINDS:
    raise ValueError(f"forward_kind: {kind!r} is not a known QModel forward; accepted: {', '.join(FORWARD_KINDS)}")
  return kind


def with_forward(qm: QModel, kind: str) -> QModel:
  """`qm` (a restored plain QModel) with the forward named by `forward_kind`."""
  if kind == "QModel":
    return qm
  if kind == "ExtQModel":
    from dqjax.methods._act_extra import as_ext
    return as_ext(qm)
  if kind == "QATModel":
    from dqjax.transform.hooks import as_qat_model
    return as_qat_model(qm)
  raise ValueError(f"checkpoint metadata field forward={kind!r} is unknown; accepted values: "
                   f"{', '.join(FORWARD_KINDS)}")


@dataclasses.dataclass(frozen=True)
class MethodEntry:
  name: str
  family: str                       # survey taxonomy, e.g. 'baseline', 'unet_ptq/bimodal', 'dit_ptq/group'
  builder: Callable[..., Recipe]    # builder(config: ml_collections.ConfigDict | None) -> Recipe
  model_families: tuple[str, ...]   # which zoo model families it applies to: 'unet', 'dit', 'unet_text'
  paper: str = ""
  settings: tuple[str, ...] = ()    # the only bit settings it accepts (e.g. BiDM: W1A1); () = any


_REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, *, family: str, model_families: Sequence[str] = ("unet", "dit", "unet_text"),
             paper: str = "", settings: Sequence[str] = ()) -> Callable:
  """Decorator registering a recipe builder under `name`. `settings` lists the bit settings of a method
  that accepts only those (the ultra-low-bit family); the benchmark runs it there instead of the suite's."""

  def deco(builder):
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = MethodEntry(name, family, builder, tuple(model_families), paper,
                                  tuple(str(x).upper() for x in settings))
    return builder

  return deco


def available(model_family: Optional[str] = None) -> list[str]:
  _load_all()
  return sorted(n for n, e in _REGISTRY.items() if model_family is None or model_family in e.model_families)


def get(name: str) -> MethodEntry:
  _load_all()
  if name not in _REGISTRY:
    raise ValueError(f"unknown method {name!r}; accepted values: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def build(name: str, config: Any = None) -> Recipe:
  return get(name).builder(config)


def _load_all():
  # Importing the method modules registers them.
  from dqjax import methods  # noqa: F401
  methods.load_all()
