"""TDQ: Temporal Dynamic Quantization for Diffusion Models (So et al., NeurIPS 2023; arXiv 2306.02316).
No public code; built from the paper.

Implemented:
- every static per-tensor activation quantizer l gets a timestep-dependent interval s_l(t) produced by a
  small MLP of a geometric Fourier encoding of t: enc(t) = [sin(pi 2^k t/T), cos(pi 2^k t/T)]_k, then
  Dense-SiLU layers and one output per quantizer; s_l(t) = s_l^0 · exp(MLP(enc(t))_l). The output layer is
  zero-initialised so training starts from the static interval s_l^0 of an ordinary calibration (the
  paper initialises the module to the static interval); the zero point stays the static one;
- the MLP is trained on the calibration samples (x_t, t) with Adam to minimise the quantization error of
  every quantizer's input, each normalised by its input's energy (`objective='quant_error'`: the float
  model runs, gradients reach s_l(t) through the LSQ straight-through quantizer), or the output MSE of the
  quantized model against the float one (`objective='output'`);
- then it is frozen: evaluated once at every timestep the sampler uses (the finite set), giving a
  per-timestep table [T_steps × quantizers] looked up inside the compiled sampler — no MLP at inference.
  Weights: per-channel static (MSE search).

Deliberate deviations: CPU-sized training (`iters`); the paper trains TDQ jointly with LSQ weights in QAT and
on calibration data for PTQ; here only the PTQ variant with fixed (searched) weights is built. Dynamic or
per-channel activation quantizers are left as they are.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dqjax.calib.data import CalibData
from dqjax.methods import common
from dqjax.methods._unet_ptq import rules_from_config
from dqjax.methods.recipe import Recipe, register
from dqjax.methods.tfmq_dm import finite_timesteps
from dqjax.quant import ops as qops
from dqjax.quant import tables
from dqjax.transform import apply as qapply
from dqjax.transform.state import ActQuant

OBJECTIVES = ("quant_error", "output")


def fourier_encoding(t, num_train_timesteps: int, num_freqs: int = 8) -> jax.Array:
  """Geometric Fourier features of t/T: [..., 2 * num_freqs]."""
  u = jnp.asarray(t, jnp.float32)[..., None] / float(num_train_timesteps)
  freqs = jnp.pi * 2.0 ** jnp.arange(num_freqs, dtype=jnp.float32)
  return jnp.concatenate([jnp.sin(u * freqs), jnp.cos(u * freqs)], axis=-1)


class IntervalMLP(nn.Module):
  """enc(t) -> one log-interval offset per quantizer (zero at initialisation)."""
  num_outputs: int
  hidden: int = 64
  depth: int = 2

  @nn.compact
  def __call__(self, enc):
    h = enc
    for i in range(self.depth):
      h = nn.silu(nn.Dense(self.hidden, name=f"hidden_{i}")(h))
    return nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros, name="out")(h)


def quantizers(qm) -> list[tuple[str, str]]:
  """(op path, operand) of every static per-tensor activation quantizer with calibrated parameters."""
  out = []
  for op in qm.plan.ops:
    st = qm.qstate.get(op.path)
    if st is None:
      continue
    for name, spec in op.acts:
      names = [name] + (["input_split"] if name == "input" and op.input_split else [])
      for n in names:
        if not spec.dynamic and spec.granularity == "tensor" and n in st.acts and not spec.is_float:
          out.append((op.path, n))
  return out


def _static(qm, path, name):
  qp = qm.qstate[path].acts[name].qp
  return qp.scale[0], (None if qp.zero_point is None else qp.zero_point[0])


def _operand_view(op, name, x):
  if op.input_split and name in ("input", "input_split"):
    return x[..., :op.input_split] if name == "input" else x[..., op.input_split:]
  return x


def tables_from_mlp(qm, mlp: IntervalMLP, mlp_params, quants: Sequence[tuple[str, str]], ts,
                    num_freqs: int):
  """{(path, operand): ActQuant per-step table} of the MLP's intervals at timesteps `ts`."""
  ts = np.asarray(ts)
  offs = mlp.apply({"params": mlp_params}, fourier_encoding(jnp.asarray(ts), qm.num_train_timesteps, num_freqs))
  index = jnp.asarray(tables.timestep_index(tables.TableSpec("per_step"), ts.astype(int).tolist(),
                                            qm.num_train_timesteps))
  out = {}
  for l, (path, name) in enumerate(quants):
    s0, z0 = _static(qm, path, name)
    scale = s0[None] * jnp.exp(offs[:, l]).reshape((len(ts),) + (1,) * s0.ndim)
    zp = None if z0 is None else jnp.broadcast_to(z0[None], scale.shape)
    out[(path, name)] = ActQuant(qops.QParams(scale, zp), index if len(ts) > 1 else None)
  return out


def _with_tables(qstate, acts: dict):
  new = dict(qstate)
  for (path, name), act in acts.items():
    new[path] = new[path].replace_act(name, act)
  return new


def train_tdq(qm, data: CalibData, *, objective: str = "quant_error", iters: int = 200, batch_size: int = 32,
              lr: float = 1e-3, hidden: int = 64, depth: int = 2, num_freqs: int = 8, seed: int = 0,
              progress: bool = True):
  """Train the interval MLP on calibration samples; returns (mlp, params, quantizer list, loss history)."""
  if objective not in OBJECTIVES:
    raise ValueError(f"TDQ objective={objective!r} is unknown; accepted values: {', '.join(OBJECTIVES)}")
  quants = quantizers(qm)
  if not quants:
    raise ValueError("TDQ found no static per-tensor activation quantizer; calibrate activations first")
  index_of = {q: i for i, q in enumerate(quants)}
  mlp = IntervalMLP(len(quants), hidden, depth)
  key = jax.random.key(seed)
  mlp_params = mlp.init(key, jnp.zeros((1, 2 * num_freqs)))["params"]
  x_all, t_all, c_all = data.flat()
  n = x_all.shape[0]
  cal_ts = np.unique(np.asarray(data.ts))
  plan, model = qm.plan, qm.model
  ops = {op.path: op for op in plan.ops}

  def loss_quant_error(p, x, t, c):
    offs = mlp.apply({"params": p}, fourier_encoding(t, qm.num_train_timesteps, num_freqs))    # [B, L]

    def stat_fn(op, operand, xin):
      stats = {}
      for name in ([operand] + (["input_split"] if operand == "input" else [])):
        l = index_of.get((op.path, name))
        if l is None:
          continue
        v = _operand_view(ops[op.path], name, xin).astype(jnp.float32)
        s0, z0 = _static(qm, op.path, name)
        scale = s0 * jnp.exp(offs[:, l]).reshape((v.shape[0],) + (1,) * (v.ndim - 1))
        q = qops.fake_quant(v, qops.QParams(scale, z0), ops[op.path].act_spec("input" if name == "input_split"
                                                                           else name))
        axes = tuple(range(1, v.ndim))
        err = jnp.mean((q - v) ** 2, axis=axes) / (jnp.mean(v ** 2, axis=axes) + 1e-8)
        stats[name] = jnp.mean(err)
      return stats or None

    stats = qapply.observe(model, plan, qm.params, qm.qstate, stat_fn, x, t, c, t=t,
                           stat_reduce=lambda a, b: a + b)
    return sum(jax.tree_util.tree_leaves(stats)) / len(quants)

  def loss_output(p, x, t, c):
    acts = tables_from_mlp(qm, mlp, p, quants, cal_ts, num_freqs)
    qstate = _with_tables(qm.qstate, acts)
    out_q = qapply.quantized_apply(model, plan, qm.params, qstate, x, t, c, t=t)
    out_fp = model.apply({"params": qm.fp_params}, x, t, c)
    return jnp.mean((out_q - jax.lax.stop_gradient(out_fp)) ** 2)

  loss_fn = loss_quant_error if objective == "quant_error" else loss_output
  opt = optax.adam(optax.cosine_decay_schedule(lr, max(iters, 1)))
  opt_state = opt.init(mlp_params)

  @jax.jit
  def step(p, o, idx):
    pick = lambda a: None if a is None else jax.tree_util.tree_map(lambda v: v[idx], a)
    l, g = jax.value_and_grad(loss_fn)(p, pick(x_all), pick(t_all), pick(c_all))
    upd, o = opt.update(g, o, p)
    return optax.apply_updates(p, upd), o, l

  rng = np.random.default_rng(seed)
  history = []
  for _ in tqdm(range(iters), desc="TDQ intervals", leave=False, disable=not progress):
    idx = jnp.asarray(rng.integers(0, n, batch_size))
    mlp_params, opt_state, l = step(mlp_params, opt_state, idx)
    history.append(l)
  return mlp, mlp_params, quants, [float(h) for h in history]


def tdq_pass(config):
  """Pass: train the interval MLP, freeze it into per-timestep tables over the sampler's timesteps."""
  get = lambda k, d: common.config_get(config, k, d)

  def run(qm, data: CalibData):
    if not quantizers(qm):
      return qm
    num_freqs = int(get("num_freqs", 8))
    mlp, p, quants, hist = train_tdq(qm, data, objective=get("objective", "quant_error"),
                                     iters=int(get("iters", 200)), batch_size=int(get("batch_size", 32)),
                                     lr=float(get("lr", 1e-3)), hidden=int(get("hidden", 64)),
                                     depth=int(get("depth", 2)), num_freqs=num_freqs,
                                     seed=int(get("seed", 0)), progress=bool(get("progress", True)))
    ts = finite_timesteps(qm, data)
    acts = tables_from_mlp(qm, mlp, p, quants, ts, num_freqs)
    return qm.replace(qstate=_with_tables(qm.qstate, acts),
                      meta={**qm.meta, "tdq_loss": (hist[0], hist[-1]), "table": "per_step"})

  return run


@register("tdq", family="unet_ptq/temporal", model_families=("unet",),
          paper="TDQ (arXiv 2306.02316)")
def tdq(config=None) -> Recipe:
  get = lambda k, d: common.config_get(config, k, d)
  rules = rules_from_config(config, weight_symmetric=True, act_symmetric=False, quantize_matmuls=True)
  passes = [common.calibrate_weights_pass(get("weight_init", "mse"), p=2.0),
            common.calibrate_activations_pass(get("act_init", "mse"), p=2.4, batch_size=get("calib_batch", None)),
            tdq_pass(config)]

  def run(qm, data):
    for p in passes:
      qm = p(qm, data)
    return qm

  return Recipe("tdq", "unet_ptq/temporal", rules, run,
                "activation intervals from an MLP of a Fourier timestep encoding, trained on calibration data, "
                "frozen into per-timestep tables")
