"""The shared QAT engine: a quantized student distilled from its own float teacher.

Teacher = the FP model (`QModel.fp_params`, never trained); student = the simulate-mode quantized forward
(`dqjax.transform.hooks.qat_apply`, which is the core forward plus the extended quantizers of the low-bit
papers). Training data is *data-free*: a pool of FP sampling trajectories drawn once from the model's own
sampler (`DiffusionEnv`), read in one of four orders:

  'trajectory'    teacher forcing along the FP trajectory, one update per sampler step, a fresh set of
                  trajectories every epoch of S steps (EfficientDM);
  'per_timestep'  all updates of one sampler step, then the next (QuEST's timewise loop);
  'random'        every example at a random (trajectory, step), optionally weighted per step (BitsFusion's
                  quantization-error-aware timestep sampling);
  'forward'       x_t = q_sample(x₀, t, ε) from the pool's FP samples x₀ and t ~ U{0..T−1}: the diffusion
                  loss needs the true ε (Q-DM, BinaryDM, BiDM, BitsFusion stage II, TuneQDM).

Losses (weighted sum): 'output' — MSE between the student's and the teacher's outputs (the CFG-combined ε for
conditional models when `guided`; EfficientDM's ε-MSE, QuEST's per-timestep output MSE, Q-DM's NeM);
'diffusion' — the student's ε-prediction loss; 'feature' — mimicking of module outputs captured by path regex:
plain MSE, BinaryDM's low-rank (teacher-PCA-projected) MSE, or BiDM's space-patched Gram distillation.

What trains is chosen by `Group`s (selectors over the leaves of {'params', 'qstate'}, each with its own
learning rate and optionally a per-leaf LR multiplier). Only selected leaves enter the optimizer: the trained
leaves are a flat dict, and `optax.multi_transform` masks every group's optimizer to its own leaves, so no
optimizer state exists for frozen leaves or for another group's leaves. The loop is
`dqjax.diffusion.training.fit`: batches and keys are pure functions of (seed, step), so a run resumed from its
orbax checkpoint ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dqjax.calib.data import CalibData
from dqjax.diffusion import samplers
from dqjax.diffusion import schedules as sched_lib
from dqjax.diffusion.guidance import classifier_free_guidance
from dqjax.diffusion.training import fit, latest_checkpoint_step
from dqjax.transform import hooks

ORDERS = ("trajectory", "per_timestep", "random", "forward")
FEATURE_LOSSES = ("mse", "lowrank", "spd")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
REDUCTIONS = ("mean", "sum")
FROZEN = "frozen"

# Module outputs that papers mimic: every ResBlock / attention block of a U-Net (the outputs of LDM's
# TimestepEmbedSequential units), every DiT transformer block.
UNET_BLOCK_OUTPUTS = (r"(down_blocks|up_blocks)_\d+/(resnets|attentions)_\d+", r"mid_block/(resnets|attentions)_\d+")
DIT_BLOCK_OUTPUTS = (r"transformer_blocks_\d+",)


# --- configuration ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Hyper-parameters of one distillation run (CPU-sized defaults; every method config keeps its paper's).

  steps / batch_size: optimizer updates and examples per update (CFG doubles the network batch).
  pool_size: FP trajectories sampled once (data-free) and reused; 'trajectory' order draws `batch_size` of
    them per epoch.
  order: 'trajectory' | 'per_timestep' | 'random' | 'forward' (see the module docstring).
  output_weight / diffusion_weight / feature_weight: loss weights (0 disables a term).
  reduction: 'mean' or 'sum' (EfficientDM sums the squared error) of the output and diffusion terms.
  same_timestep: 'random' / 'forward' orders draw one timestep per batch instead of one per example (methods
    whose *weights* depend on the timestep, e.g. TuneQDM's experts, need a single timestep per forward).
  guided: for conditional models with guidance ≠ 1, the output loss compares CFG-combined ε (one network
    call on [x; x] with [cond; null], as the sampler runs); otherwise the raw outputs.
  feature_patterns: module-path regexes whose outputs are mimicked; feature_loss: 'mse' | 'lowrank' | 'spd'.
  lowrank_frac: the teacher-PCA basis keeps this fraction of the channels (BinaryDM: 1/4).
  spd_grid: patches per side for 'spd' (BiDM: 4), reduced so that every patch is at least 1 pixel.
  optimizer: 'adam' | 'adamw' (+ weight_decay); schedule: 'constant' | 'linear' | 'cosine' decay to 0 after
    `warmup` steps; clip_norm: global gradient-norm clipping (None: off).
  ckpt_dir: orbax checkpoints for resuming (None: none); save_every / log_every: in steps.
  """
  steps: int = 200
  batch_size: int = 8
  pool_size: int = 32
  order: str = "trajectory"
  output_weight: float = 1.0
  diffusion_weight: float = 0.0
  feature_weight: float = 0.0
  reduction: str = "mean"
  same_timestep: bool = False
  guided: bool = True
  feature_patterns: tuple[str, ...] = ()
  feature_loss: str = "mse"
  lowrank_frac: float = 0.25
  spd_grid: int = 4
  optimizer: str = "adam"
  weight_decay: float = 0.0
  schedule: str = "constant"
  warmup: int = 0
  clip_norm: Optional[float] = None
  seed: int = 0
  ckpt_dir: Optional[str] = None
  save_every: int = 100
  log_every: int = 25
  progress: bool = True

  def __post_init__(self):
    for name, value, accepted in (("order", self.order, ORDERS), ("feature_loss", self.feature_loss, FEATURE_LOSSES),
                                  ("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                                  ("reduction", self.reduction, REDUCTIONS)):
      if value not in accepted:
        raise ValueError(f"DistillConfig.{name}={value!r} is unknown; accepted values: {', '.join(accepted)}")
    for name in ("steps", "batch_size", "pool_size", "save_every", "log_every", "spd_grid"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "steps" else 1):
        raise ValueError(f"DistillConfig.{name}={v!r} must be a {'non-negative' if name == 'steps' else 'positive'} "
                         "integer")
    if not 0.0 < self.lowrank_frac <= 1.0:
      raise ValueError(f"DistillConfig.lowrank_frac={self.lowrank_frac!r} must lie in (0, 1]")
    if self.feature_weight and not self.feature_patterns:
      raise ValueError("DistillConfig.feature_weight > 0 needs feature_patterns (module-path regexes)")
    for p in self.feature_patterns:
      try:
        re.compile(p)
      except re.error as e:
        raise ValueError(f"DistillConfig.feature_patterns has an invalid regex {p!r}: {e}") from None


def config_from(config: Any, base: DistillConfig = DistillConfig(), **overrides) -> DistillConfig:
  """A DistillConfig from the same-named fields of a method's ml_collections config (missing fields keep
  `base`), then `overrides`."""
  vals = {}
  for f in dataclasses.fields(DistillConfig):
    if config is not None:
      try:
        present = f.name in config
      except TypeError:
        present = hasattr(config, f.name)
      if present:
        v = config[f.name] if hasattr(config, "__getitem__") else getattr(config, f.name)
        vals[f.name] = tuple(v) if isinstance(v, list) else v
  vals.update(overrides)
  return dataclasses.replace(base, **vals)


# --- which leaves train ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LeafInfo:
  """One array of the student's variables {'params': ..., 'qstate': ...}.

  root: 'params' or 'qstate'. module: the module (params) or op (qstate) path. field: the parameter name
  ('kernel', 'bias') or the OpState field path ('weight/scale', 'acts/input/qp/scale', 'lora/0',
  'extra/lmb/alpha1', ...).
  """
  root: str
  module: str
  field: str


@dataclasses.dataclass(frozen=True)
class Group:
  """Leaves selected by `select(info)` train with learning rate `lr` (first matching group wins).
  `lr_scale(info, value)` returns a per-leaf LR multiplier (EfficientDM's per-layer LoRA rate)."""
  name: str
  lr: float
  select: Callable[[LeafInfo], bool]
  lr_scale: Optional[Callable[[LeafInfo, Any], float]] = None

  def __post_init__(self):
    if self.name == FROZEN:
      raise ValueError(f"Group.name={FROZEN!r} is reserved for untrained leaves")
    if not (self.lr >= 0 and math.isfinite(self.lr)):
      raise ValueError(f"Group {self.name!r}: lr={self.lr!r} must be a finite number ≥ 0")


def _rx(pattern: str):
  return re.compile(pattern)


def lora(pattern: str = ".*") -> Callable[[LeafInfo], bool]:
  """LoRA adapters (A and B) of ops whose path fully matches `pattern`."""
  r = _rx(pattern)
  return lambda l: l.root == "qstate" and l.field.startswith("lora/") and bool(r.fullmatch(l.module))


def weight_scales(pattern: str = ".*", *, zero_point: bool = False) -> Callable[[LeafInfo], bool]:
  """Weight quantizer step sizes (LSQ) and optionally their zero points."""
  r = _rx(pattern)
  names = {"weight/scale", "weight_split/scale"} | (
      {"weight/zero_point", "weight_split/zero_point"} if zero_point else set())
  return lambda l: l.root == "qstate" and l.field in names and bool(r.fullmatch(l.module))


def act_params(pattern: str = ".*", *, zero_point: bool = True) -> Callable[[LeafInfo], bool]:
  """Activation quantizer tables (every entry: per-timestep LSQ/LSQ+ scales and zero points)."""
  r = _rx(pattern)
  ends = ("qp/scale", "qp/zero_point") if zero_point else ("qp/scale",)
  return lambda l: (l.root == "qstate" and l.field.startswith("acts/") and l.field.endswith(ends)
                    and bool(r.fullmatch(l.module)))


def kernels(pattern: str = ".*") -> Callable[[LeafInfo], bool]:
  r = _rx(pattern)
  return lambda l: l.root == "params" and l.field == "kernel" and bool(r.fullmatch(l.module))


def biases(pattern: str = ".*") -> Callable[[LeafInfo], bool]:
  r = _rx(pattern)
  return lambda l: l.root == "params" and l.field == "bias" and bool(r.fullmatch(l.module))


def extra(name: str, pattern: str = ".*", fields: Optional[Sequence[str]] = None) -> Callable[[LeafInfo], bool]:
  """Method arrays in `OpState.extra[name]` (optionally only the named sub-fields)."""
  r = _rx(pattern)
  pre = f"extra/{name}/"

  def sel(l):
    if l.root != "qstate" or not l.field.startswith(pre) or not r.fullmatch(l.module):
      return False
    return fields is None or l.field[len(pre):].split("/")[0] in fields

  return sel


def any_of(*selectors) -> Callable[[LeafInfo], bool]:
  return lambda l: any(s(l) for s in selectors)


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _info(path) -> LeafInfo:
  names = [_key_name(e) for e in path]
  if names[0] == "params":
    return LeafInfo("params", "/".join(names[1:-1]), names[-1])
  return LeafInfo("qstate", names[1], "/".join(names[2:]))


@dataclasses.dataclass(frozen=True)
class Partition:
  """The student's variables split into trained leaves (a flat dict, keyed `NNNN_name`) and the rest."""
  treedef: Any
  keys: tuple[str, ...]          # one per leaf of the full tree, in flatten order
  infos: tuple[LeafInfo, ...]
  labels: tuple[str, ...]        # group name or FROZEN, per leaf

  @property
  def train_keys(self) -> tuple[str, ...]:
    return tuple(k for k, g in zip(self.keys, self.labels) if g != FROZEN)

  def split(self, variables) -> tuple[dict, list]:
    leaves = self.treedef.flatten_up_to(variables)
    train = {k: v for k, v, g in zip(self.keys, leaves, self.labels) if g != FROZEN}
    frozen = [None if g != FROZEN else v for v, g in zip(leaves, self.labels)]
    return train, frozen

  def merge(self, train: dict, frozen: list):
    return self.treedef.unflatten([train[k] if g != FROZEN else v
                                   for k, v, g in zip(self.keys, frozen, self.labels)])

  def label_tree(self) -> dict:
    return {k: g for k, g in zip(self.keys, self.labels) if g != FROZEN}

  def counts(self) -> dict:
    out: dict = {}
    for g in self.labels:
      out[g] = out.get(g, 0) + 1
    return out


def partition(variables, groups: Sequence[Group]) -> Partition:
  """Label every leaf of {'params', 'qstate'} with its group (first match) or FROZEN; non-float leaves
  (timestep indices, integer codes) are always frozen."""
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(f"group names must be unique; got {names}")
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  keys, infos, labels = [], [], []
  for i, (path, leaf) in enumerate(flat):
    info = _info(path)
    label = FROZEN
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      for g in groups:
        if g.select(info):
          label = g.name
          break
    safe = re.sub(r"[^A-Za-z0-9]+", "_", f"{info.module}_{info.field}").strip("_")
    keys.append(f"{i:05d}_{safe}")
    infos.append(info)
    labels.append(label)
  return Partition(treedef, tuple(keys), tuple(infos), tuple(labels))


# --- optimizer --------------------------------------------------------------------------------------
def _scale_leaves(factors: dict) -> optax.GradientTransformation:
  """Multiply each leaf's update by a constant (per-leaf learning rates); stateless."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return {k: (u if isinstance(u, optax.MaskedNode) or k not in factors else u * factors[k])
            for k, u in updates.items()}, state

  return optax.GradientTransformation(init, update)


def _schedule(kind: str, lr: float, steps: int, warmup: int):
  decay_steps = max(steps - warmup, 1)
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    main = optax.cosine_decay_schedule(lr, decay_steps)
  if warmup > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
  return main


def make_optimizer(cfg: DistillConfig, groups: Sequence[Group], part: Partition, train: dict) -> optax.GradientTransformation:
  """`multi_transform` over the trained leaves: one Adam(W) per group, masked to that group's leaves."""
  transforms = {}
  for g in groups:
    chain = [optax.scale_by_adam()]
    if cfg.optimizer == "adamw" and cfg.weight_decay > 0:
      chain.append(optax.add_decayed_weights(cfg.weight_decay))
    if g.lr_scale is not None:
      factors = {k: float(g.lr_scale(info, train[k])) for k, info, lab in zip(part.keys, part.infos, part.labels)
                 if lab == g.name}
      chain.append(_scale_leaves(factors))
    chain.append(optax.scale_by_learning_rate(_schedule(cfg.schedule, g.lr, cfg.steps, cfg.warmup)))
    transforms[g.name] = optax.chain(*chain)
  tx = optax.multi_transform(transforms, part.label_tree())
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx


@struct.dataclass
class DistillState:
  """What a distillation run needs to continue: trained leaves, optimizer state, completed steps."""
  train: dict
  opt_state: Any
  step: jax.Array


# --- data: FP trajectories -------------------------------------------------------------------------
@struct.dataclass
class TrajectoryPool:
  """FP sampling trajectories: xs [S, P, ...] the network inputs x_t, ts [S] timesteps, conds [P, ...] the
  conditioning (None: unconditional), x0 [P, ...] the final FP samples (None when unknown)."""
  xs: jax.Array
  ts: jax.Array
  conds: Optional[jax.Array] = None
  x0: Optional[jax.Array] = None

  @property
  def num_steps(self) -> int:
    return int(self.xs.shape[0])

  @property
  def size(self) -> int:
    return int(self.xs.shape[1])


def _guidance(env) -> float:
  return 1.0 if env is None else float(env.guidance_scale)


def _null_batch(null, cond, b: int):
  """The CFG null conditioning as a batch shaped like `cond`."""
  n, c = jnp.asarray(null), jnp.asarray(cond)
  if n.ndim == c.ndim and n.shape[0] == b:
    return n.astype(c.dtype)
  if n.ndim == c.ndim and n.shape[0] == 1:
    return jnp.broadcast_to(n, (b,) + n.shape[1:]).astype(c.dtype)
  return jnp.broadcast_to(n, (b,) + n.shape).astype(c.dtype)


def fp_denoiser(qm) -> Callable:
  return lambda x, t, cond=None: qm.model.apply({"params": qm.fp_params}, x, t, cond)


def make_pool(qm, size: int, seed: int = 0) -> TrajectoryPool:
  """`size` FP trajectories of the model's own sampler (CFG as configured in `qm.env`): data-free training
  data. Deterministic in `seed`."""
  env = qm.env
  if env is None:
    raise ValueError("distillation from trajectories needs QModel.env (a DiffusionEnv: schedule, sampler, "
                     "sample shape, conditioning); pass `data=` calibration data instead")
  k_noise, k_cond, k_sample = jax.random.split(jax.random.key(seed), 3)
  x_T = jax.random.normal(k_noise, (size,) + tuple(env.sample_shape))
  cond = None if env.cond_sampler is None else env.cond_sampler(k_cond, size)
  denoise = fp_denoiser(qm)
  if cond is not None and _guidance(env) != 1.0:
    denoise = classifier_free_guidance(denoise, _guidance(env), env.null_cond)
  run = jax.jit(lambda x, k, c: samplers.sample(denoise, env.schedule, env.sampler, x, k, c, return_trajectory=True))
  res = run(x_T, k_sample, cond)
  return TrajectoryPool(res.trajectory.xs, res.trajectory.ts, cond, res.x0)


def pool_from_calib(data: CalibData) -> TrajectoryPool:
  """A pool from calibration data (no env): the stored inputs as they are, no final samples."""
  conds = None if data.conds is None else jnp.asarray(data.conds)[0]
  return TrajectoryPool(jnp.asarray(data.xs), jnp.asarray(data.ts, jnp.float32), conds, None)


def pool_calib_data(pool: TrajectoryPool, env=None) -> CalibData:
  """The exact network inputs of the pool's trajectories (CFG doubles the batch with the null conditioning),
  step-major, for per-step activation calibration."""
  xs, conds = pool.xs, pool.conds
  if conds is not None and _guidance(env) != 1.0 and env is not None and env.null_cond is not None:
    n = xs.shape[1]
    both = jnp.concatenate([jnp.asarray(conds), _null_batch(env.null_cond, conds, n)], 0)
    xs = jnp.concatenate([xs, xs], axis=1)
    conds = both
  c = None if conds is None else jnp.broadcast_to(jnp.asarray(conds)[None], (xs.shape[0],) + jnp.asarray(conds).shape)
  return CalibData(jnp.asarray(xs), jnp.asarray(pool.ts, jnp.float32), c, jnp.arange(xs.shape[0])).validate()


def make_batch_fn(pool: TrajectoryPool, cfg: DistillConfig, num_train_timesteps: int,
                  step_weights: Optional[np.ndarray] = None) -> Callable[[int], dict]:
  """`step -> batch`, a pure function of (cfg.seed, step). A batch is {'x': x_t or x₀, 'noise', 't' [B],
  'cond' (if conditional), 'step'}; in 'forward' order x is x₀ and the step function noises it."""
  xs = np.asarray(pool.xs)
  ts = np.asarray(pool.ts, np.float32)
  conds = None if pool.conds is None else np.asarray(pool.conds)
  x0 = None if pool.x0 is None else np.asarray(pool.x0)
  s, p = xs.shape[:2]
  b, seed = cfg.batch_size, cfg.seed
  if cfg.order == "forward" and x0 is None:
    raise ValueError("DistillConfig.order='forward' needs the pool's final samples x0 (a pool from make_pool)")
  probs = None
  if step_weights is not None:
    w = np.asarray(step_weights, np.float64)
    if w.shape != (s,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"step_weights must be {s} finite non-negative numbers with a positive sum")
    probs = w / w.sum()
  per_step = max(1, math.ceil(cfg.steps / s))

  def pick(rng, n):
    return rng.choice(p, size=n, replace=n > p)

  def batch(i: int) -> dict:
    i = int(i)
    rng = np.random.default_rng([seed, i])
    noise = np.zeros((b,) + xs.shape[2:], np.float32)
    if cfg.order == "trajectory":
      epoch, j = divmod(i, s)
      sel = np.random.default_rng([seed, epoch, 1]).permutation(p)[:b] if b <= p else pick(
          np.random.default_rng([seed, epoch, 1]), b)
      x, t = xs[j, sel], np.full((b,), ts[j], np.float32)
    elif cfg.order == "per_timestep":
      j = min(i // per_step, s - 1)
      sel = pick(rng, b)
      x, t = xs[j, sel], np.full((b,), ts[j], np.float32)
    elif cfg.order == "random":
      j = rng.choice(s, size=1 if cfg.same_timestep else b, p=probs)
      j = np.broadcast_to(j, (b,))
      sel = pick(rng, b)
      x, t = xs[j, sel], ts[j].astype(np.float32)
    else:
      sel = pick(rng, b)
      n_t = 1 if cfg.same_timestep else b
      if probs is None:
        t = rng.integers(0, num_train_timesteps, size=n_t).astype(np.float32)
      else:
        t = ts[rng.choice(s, size=n_t, p=probs)].astype(np.float32)
      t = np.broadcast_to(t, (b,)).copy()
      x = x0[sel]
      noise = rng.standard_normal(x.shape).astype(np.float32)
    out = {"x": np.asarray(x, np.float32), "noise": noise, "t": t, "step": np.int32(i)}
    if conds is not None:
      out["cond"] = conds[sel]
    return out

  return batch


# --- losses -------------------------------------------------------------------------------------------
def _reduce(err, how: str):
  return jnp.sum(err) if how == "sum" else jnp.mean(err)


def lowrank_basis(feature: jax.Array, frac: float) -> jax.Array:
  """Top-q principal directions [C, q] of a teacher feature's channel vectors (q = max(1, ⌊C·frac⌋)),
  centred, in float64 on the host (BinaryDM's cached `pca_lowrank`)."""
  f = np.asarray(feature, np.float64).reshape(-1, feature.shape[-1])
  f = f - f.mean(0, keepdims=True)
  q = max(1, int(feature.shape[-1] * frac))
  _, _, vt = np.linalg.svd(f, full_matrices=False)
  return jnp.asarray(vt[:q].T, jnp.float32)


def spd_loss(s: jax.Array, t: jax.Array, grid: int) -> jax.Array:
  """BiDM's space-patched distillation of one NHWC feature: split H×W into grid×grid patches; per patch and
  channel the spatial Gram G = P Pᵀ ([h, h]); each patch's Grams (all examples and channels) are divided by
  their Frobenius norm; the loss is the mean over patches of ‖Ĝ_s − Ĝ_t‖_F."""
  if s.ndim != 4:
    s = s.reshape(s.shape[0], -1, 1, s.shape[-1])
    t = t.reshape(s.shape)
  b, h, w, c = s.shape
  g = max(1, min(grid, h, w))
  ph, pw = h // g, w // g

  def grams(f):
    f = f[:, :g * ph, :g * pw, :].reshape(b, g, ph, g, pw, c)
    gm = jnp.einsum("bihjwc,bikjwc->ijbchk", f, f)
    norm = jnp.sqrt(jnp.sum(gm * gm, axis=(2, 3, 4, 5), keepdims=True)) + 1e-8
    return gm / norm

  d = grams(s) - grams(t)
  return jnp.mean(jnp.sqrt(jnp.sum(d * d, axis=(2, 3, 4, 5)) + 1e-12))


def feature_loss(sf: dict, tf: dict, cfg: DistillConfig, bases: Optional[dict] = None) -> jax.Array:
  if not tf:
    raise ValueError(f"feature_patterns {cfg.feature_patterns} captured no module output; check the regexes "
                     "against the model's module paths")
  terms = []
  for k in sorted(tf):
    s, t = sf[k], jax.lax.stop_gradient(tf[k])
    if cfg.feature_loss == "mse":
      terms.append(jnp.mean((s - t) ** 2))
    elif cfg.feature_loss == "lowrank":
      v = bases[k]
      terms.append(jnp.mean((s.reshape(-1, s.shape[-1]) @ v - t.reshape(-1, t.shape[-1]) @ v) ** 2))
    else:
      terms.append(spd_loss(s, t, cfg.spd_grid))
  return jnp.mean(jnp.stack(terms))


# --- the run -----------------------------------------------------------------------------------------
def _network_inputs(batch, env, cfg: DistillConfig, schedule):
  """(x, t, cond) the network sees, the ε target and whether outputs are CFG pairs."""
  x, t = batch["x"], batch["t"]
  noise = batch["noise"]
  if cfg.order == "forward":
    x0 = x
    x = sched_lib.q_sample(schedule, x0, t, noise)
    noise = sched_lib.training_target(schedule, x0, t, noise)
  cond = batch.get("cond")
  paired = cond is not None and env is not None and _guidance(env) != 1.0 and env.null_cond is not None
  if paired:
    b = x.shape[0]
    cond = jnp.concatenate([jnp.asarray(cond), _null_batch(env.null_cond, cond, b)], 0)
    x, t, noise = (jnp.concatenate([a, a], 0) for a in (x, t, noise))
  return x, t, cond, noise, paired


def _combine(out, c: int, paired: bool, scale: float, guided: bool):
  if not paired:
    return out
  if not guided:
    return out
  b = out.shape[0] // 2
  oc, ou = out[:b, ..., :c], out[b:, ..., :c]
  return ou + scale * (oc - ou)


def make_loss(qm, cfg: DistillConfig, part: Partition, bases: Optional[dict] = None,
              extra_loss: Optional[Callable] = None) -> Callable:
  """`loss(train, frozen, batch) -> (total, terms)`; frozen = (frozen leaves, teacher params)."""
  model, plan, env = qm.model, qm.plan, qm.env
  schedule = env.schedule if env is not None else None
  patterns = tuple(cfg.feature_patterns) if cfg.feature_weight else ()
  scale = _guidance(env)

  def loss(train, frozen, batch):
    leaves, fp_params = frozen
    variables = part.merge(train, leaves)
    x, t, cond, target, paired = _network_inputs(batch, env, cfg, schedule)
    c = x.shape[-1]
    s_res = hooks.qat_apply(model, plan, variables["params"], variables["qstate"], x, t, cond,
                            step=batch["step"], capture=patterns)
    s_out, s_feats = s_res if patterns else (s_res, None)
    terms = {}
    total = jnp.float32(0.0)
    if cfg.output_weight or cfg.feature_weight:
      t_res = hooks.capture_apply(model, fp_params, x, t, cond, patterns)
      t_out, t_feats = t_res if patterns else (t_res, None)
      t_out = jax.lax.stop_gradient(t_out)
      if cfg.output_weight:
        so = _combine(s_out, c, paired, scale, cfg.guided)
        to = _combine(t_out, c, paired, scale, cfg.guided)
        terms["output"] = _reduce((so - to) ** 2, cfg.reduction)
        total = total + cfg.output_weight * terms["output"]
      if cfg.feature_weight:
        terms["feature"] = feature_loss(s_feats, t_feats, cfg, bases)
        total = total + cfg.feature_weight * terms["feature"]
    if cfg.diffusion_weight:
      terms["diffusion"] = _reduce((s_out[..., :c] - target) ** 2, cfg.reduction)
      total = total + cfg.diffusion_weight * terms["diffusion"]
    if extra_loss is not None:
      e = extra_loss(variables, batch)
      terms["extra"] = e
      total = total + e
    return total, terms

  return loss


def _project(train: dict, part: Partition) -> dict:
  """Keep quantizer step sizes positive after an update."""
  pos = {k for k, info, g in zip(part.keys, part.infos, part.labels) if g != FROZEN and info.field.endswith("/scale")}
  return {k: (jnp.maximum(v, 1e-8) if k in pos else v) for k, v in train.items()}


def make_step(loss: Callable, tx: optax.GradientTransformation, part: Partition) -> Callable:
  @jax.jit
  def step(state: DistillState, frozen, batch):
    (total, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.train, frozen, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.train)
    train = _project(optax.apply_updates(state.train, updates), part)
    metrics = {"loss": total, "grad_norm": optax.global_norm(grads), **terms}
    return DistillState(train, opt_state, state.step + 1), metrics

  return step


def compute_bases(qm, cfg: DistillConfig, batch: dict) -> dict:
  """BinaryDM's cached teacher-PCA bases, from the teacher features of the first batch."""
  x, t, cond, _, _ = _network_inputs({k: jnp.asarray(v) for k, v in batch.items()}, qm.env, cfg,
                                     None if qm.env is None else qm.env.schedule)
  _, feats = jax.jit(lambda p, x, t, c: hooks.capture_apply(qm.model, p, x, t, c, tuple(cfg.feature_patterns)))(
      qm.fp_params, x, t, cond)
  return {k: lowrank_basis(v, cfg.lowrank_frac) for k, v in feats.items()}


def distill(qm, cfg: DistillConfig, groups: Sequence[Group], *, data: Optional[CalibData] = None,
            pool: Optional[TrajectoryPool] = None, step_weights=None, extra_loss: Optional[Callable] = None,
            callback: Optional[Callable[[int, dict], None]] = None, desc: str = "distill"):
  """Train the selected leaves of `qm` by distillation from its FP teacher; returns the updated QModel with
  `meta['distill']` (steps, wall time, first/last loss, trained leaves per group).

  pool: training trajectories (default: `make_pool(qm, cfg.pool_size, cfg.seed)`, or the calibration data
    when the QModel has no env). step_weights: [S] sampling weights over trajectory steps ('random' and
    'forward' orders). extra_loss(variables, batch) -> scalar: a method's own additional term.
  callback(step, metrics): called every `cfg.log_every` steps with float metrics (after the step).
  With `cfg.ckpt_dir`, a run restarts from the newest checkpoint there (`meta['distill']['resumed_from']`).
  """
  start = time.perf_counter()
  if pool is None:
    if qm.env is not None:
      pool = make_pool(qm, cfg.pool_size, cfg.seed)
    elif data is not None:
      pool = pool_from_calib(data)
    else:
      raise ValueError("distill needs QModel.env (to sample FP trajectories) or calibration `data`")
  variables = {"params": qm.params, "qstate": qm.qstate}
  part = partition(variables, groups)
  train, frozen = part.split(variables)
  counts = {g.name: part.counts().get(g.name, 0) for g in groups}
  meta = {"steps": int(cfg.steps), "order": cfg.order, "trained_leaves": counts,
          "trained_values": int(sum(np.size(v) for v in train.values()))}
  if not train or cfg.steps == 0:
    return qm.replace(meta={**qm.meta, "distill": {**meta, "train_seconds": 0.0}})
  batch_fn = make_batch_fn(pool, cfg, qm.num_train_timesteps, step_weights)
  bases = None
  if cfg.feature_weight and cfg.feature_loss == "lowrank":
    bases = compute_bases(qm, cfg, batch_fn(0))
  tx = make_optimizer(cfg, groups, part, train)
  loss = make_loss(qm, cfg, part, bases, extra_loss)
  step = make_step(loss, tx, part)
  frozen_args = (frozen, qm.fp_params)
  state = DistillState(train, tx.init(train), jnp.zeros((), jnp.int32))
  history: list = []

  def log(i, m):
    history.append((i, m))
    if callback is not None:
      callback(i, m)

  meta["resumed_from"] = latest_checkpoint_step(cfg.ckpt_dir) if cfg.ckpt_dir else None
  state = fit(state, lambda s, b, k: step(s, frozen_args, b), batch_fn, cfg.steps, cfg.ckpt_dir, seed=cfg.seed,
              save_every=cfg.save_every, log_every=cfg.log_every, desc=desc, progress=cfg.progress, log_fn=log)
  variables = part.merge(state.train, frozen)
  meta.update(train_seconds=time.perf_counter() - start,
              loss_first=history[0][1]["loss"] if history else None,
              loss_last=history[-1][1]["loss"] if history else None,
              history=[(i, {k: float(v) for k, v in m.items()}) for i, m in history])
  return qm.replace(params=variables["params"], qstate=variables["qstate"],
                    meta={**qm.meta, "distill": meta})


def stepwise_error(qm, pool: TrajectoryPool, *, batch_size: Optional[int] = None) -> np.ndarray:
  """Mean squared ε error (student vs teacher, CFG-combined for conditional models) at every trajectory
  step [S]: what a quantized model gets wrong, per timestep (BitsFusion's timestep weighting, reports)."""
  env = qm.env
  n = pool.size if batch_size is None else min(batch_size, pool.size)
  cfg = DistillConfig(order="trajectory")

  @jax.jit
  def one(variables, fp_params, x, t, cond):
    batch = {"x": x, "t": jnp.full((x.shape[0],), t), "noise": jnp.zeros_like(x), "step": jnp.int32(0)}
    if cond is not None:
      batch["cond"] = cond
    xx, tt, cc, _, paired = _network_inputs(batch, env, cfg, None)
    s = hooks.qat_apply(qm.model, qm.plan, variables["params"], variables["qstate"], xx, tt, cc)
    f = hooks.capture_apply(qm.model, fp_params, xx, tt, cc)
    c = x.shape[-1]
    return jnp.mean((_combine(s, c, paired, _guidance(env), True)[..., :c] -
                     _combine(f, c, paired, _guidance(env), True)[..., :c]) ** 2)

  variables = {"params": qm.params, "qstate": qm.qstate}
  cond = None if pool.conds is None else pool.conds[:n]
  return np.array([float(one(variables, qm.fp_params, pool.xs[j, :n], pool.ts[j], cond))
                   for j in range(pool.num_steps)])
