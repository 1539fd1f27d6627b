"""BRECQ block reconstruction: the engine behind Q-Diffusion, EDA-DM, TFMQ-DM (and PTQD, QuEST, PTQ4DiT).

A model is cut into *blocks* by module-path prefixes (every `*/resnets_N`, `*/attentions_N`, the time
embedding; every quantized op outside a block is a block of its own, i.e. layer reconstruction). Blocks are
optimised one after the other, in call order. For each block:

1. its inputs are captured by running the whole model with the block's module intercepted, once with the
   model quantized as far as it has been reconstructed (BRECQ's "asym" inputs) and once in float (targets
   and QDrop's float inputs). Only the captured values are returned from the jitted capture, so XLA drops
   everything after the block: no StopForward exception is needed;
2. the block's own submodule is re-created unbound (`module.clone(parent=None)`) and applied alone to the
   captured inputs with its parameter subtree, under a block-local interceptor that fake-quantizes its
   ops (soft AdaRound rounding while training, optional QDrop bypass, recording of layer outputs);
3. an optax Adam loop (a jitted `lax.scan` over chunks of iterations) minimises
   `loss(trainables, frozen, block_inputs, targets)`: Lp block-output error (+ EDA-DM's per-layer
   terms, + any number of outputs for TFMQ-DM's temporal block) + the AdaRound regulariser with β
   annealed 20→2 after a 20% warm-up. Trainables are the AdaRound logits V (phase 'weights'), the
   activation scales (phase 'acts', LSQ gradients through `fake_quant`), or both (phase 'joint', EDA-DM).

Afterwards every op keeps its V in `OpState.rounding`; the quantized model then rounds hard (h = 1[V ≥ 0]),
so weights stay on the quantization grid. Everything is deterministic given `ReconConfig.seed`.

A block whose `path` is '' is the whole model: with `outputs` naming module paths, its loss compares those
modules' outputs (TFMQ-DM's temporal information block: the time-embedding MLP and every ResBlock's
`time_emb_proj`, which depend on t only), and XLA again prunes what the outputs do not need.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dqjax.calib.data import CalibData
from dqjax.transform import apply as qapply
from dqjax.transform.discover import module_path, op_kind
from dqjax.transform.rules import OpPlan, Plan
from dqjax.transform.state import OpState

# Block patterns (full-match regexes over module paths); the outermost matching prefix of an op is its block.
UNET_BLOCKS = (r"(.+/)?resnets_\d+", r"(.+/)?attentions_\d+", r"time_embedding")
DIT_BLOCKS = (r"(.+/)?transformer_blocks_\d+", r"time_embedding", r"(.+/)?timestep_embedder")
PHASES = ("weights", "acts", "joint")
SCHEDULES = ("constant", "cosine")


# --- partition ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
  """One unit of reconstruction.

  name: display name. path: the module run on its own ('' = the whole model). ops: absolute op paths whose
  quantizers are learned here (other quantized ops under `path` run with their current state). outputs:
  absolute module paths whose outputs make up the loss; () means the block's own return value.
  """
  name: str
  path: str
  ops: tuple[str, ...]
  outputs: tuple[str, ...] = ()


def under(path: str, prefix: str) -> bool:
  """Is module `path` inside (or equal to) the module `prefix` ('' contains everything)?"""
  return prefix == "" or path == prefix or path.startswith(prefix + "/")


def relative(path: str, prefix: str) -> str:
  if prefix == "":
    return path
  return "" if path == prefix else path[len(prefix) + 1:]


def block_path_of(op_path: str, patterns: Sequence[str]) -> Optional[str]:
  """The outermost module prefix of `op_path` (the op itself excluded) that fully matches a pattern."""
  parts = op_path.split("/")
  for i in range(1, len(parts)):
    prefix = "/".join(parts[:i])
    if any(re.fullmatch(p, prefix) for p in patterns):
      return prefix
  return None


def partition(plan: Plan, patterns: Sequence[str] = UNET_BLOCKS, *, exclude: Sequence[str] = (),
              standalone: bool = True) -> list[Block]:
  """Blocks of a plan in call order.

  Every quantized op goes to the block of its outermost prefix matching `patterns`; ops outside all blocks
  become single-layer blocks (`standalone=True`) or are skipped. Ops whose path fully matches a regex in
  `exclude` are not learned by any block (they still run quantized inside their block).
  """
  for p in list(patterns) + list(exclude):
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"block pattern {p!r} is not a valid regex: {e}") from None
  groups: dict[str, list[str]] = {}
  for op in plan.ops:
    if not op.quantized or any(re.fullmatch(e, op.path) for e in exclude):
      continue
    bp = block_path_of(op.path, patterns)
    if bp is None:
      if not standalone:
        continue
      bp = op.path
    groups.setdefault(bp, []).append(op.path)
  return [Block(bp, bp, tuple(ops)) for bp, ops in groups.items()]


# --- configuration ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ReconConfig:
  """Hyper-parameters of one reconstruction phase (defaults: Q-Diffusion's weight phase).

  iters / batch_size: Adam steps per block and samples per step (paper: 20000 / 32 for weights, 5000 for
    activation steps). lr_w / lr_a: learning rates of AdaRound V and of activation scales.
  schedule_w / schedule_a: 'constant' or 'cosine' decay to 0 over `iters`.
  round_weight (λ), b_range (β start, end), warmup (fraction of iters without the regulariser, β fixed):
    the AdaRound regulariser; `round_loss=False` drops it (EDA-DM).
  p: exponent of the Lp reconstruction loss (2 for weights, 2.4 for activation steps).
  asym: block inputs from the quantized-so-far model (BRECQ/Q-Diffusion); False: float inputs.
  qdrop_prob: probability that an activation element is quantized while training (QDrop's p; 1 = always).
  input_prob: probability that a block-input element comes from the quantized model rather than the float
    one (QDrop's input mixing; 1 = pure asym inputs).
  layer_loss: weight of the per-layer output terms (EDA-DM's fine-grained block reconstruction; 0 = off).
  num_samples: at most this many calibration samples are used (evenly spread; None = all).
  capture_batch: forward batch for input/target capture. chunk: iterations per compiled call.
  """
  iters: int = 20000
  batch_size: int = 32
  lr_w: float = 1e-3
  lr_a: float = 4e-4
  schedule_w: str = "constant"
  schedule_a: str = "cosine"
  round_weight: float = 0.01
  b_range: tuple[float, float] = (20.0, 2.0)
  warmup: float = 0.2
  round_loss: bool = True
  p: float = 2.0
  asym: bool = True
  qdrop_prob: float = 1.0
  input_prob: float = 1.0
  layer_loss: float = 0.0
  num_samples: Optional[int] = None
  capture_batch: int = 64
  chunk: int = 50
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    for name in ("iters", "batch_size", "capture_batch", "chunk"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"ReconConfig.{name}={v!r} must be a positive integer")
    for name in ("qdrop_prob", "input_prob", "warmup"):
      v = getattr(self, name)
      if not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"ReconConfig.{name}={v!r} is out of range; accepted: a number in [0, 1]")
    for name in ("schedule_w", "schedule_a"):
      if getattr(self, name) not in SCHEDULES:
        raise ValueError(f"ReconConfig.{name}={getattr(self, name)!r} is unknown; accepted values: "
                         f"{', '.join(SCHEDULES)}")
    object.__setattr__(self, "b_range", tuple(float(b) for b in self.b_range))
    if len(self.b_range) != 2:
      raise ValueError(f"ReconConfig.b_range={self.b_range!r} must be a pair (start, end)")
    if self.p <= 0 or self.lr_w <= 0 or self.lr_a <= 0 or self.round_weight < 0 or self.layer_loss < 0:
      raise ValueError("ReconConfig: p, lr_w and lr_a must be positive; round_weight and layer_loss >= 0")
    if self.num_samples is not None and self.num_samples < 1:
      raise ValueError(f"ReconConfig.num_samples={self.num_samples!r} must be a positive integer or None")

  def replace(self, **changes) -> "ReconConfig":
    return dataclasses.replace(self, **changes)


def config_from(cfg: Any, prefix: str = "", base: ReconConfig = ReconConfig()) -> ReconConfig:
  """A ReconConfig from the fields `<prefix><field>` of an ml_collections config or dict (missing: `base`'s)."""
  if cfg is None:
    return base
  changes = {}
  for f in dataclasses.fields(ReconConfig):
    key = prefix + f.name
    if key in cfg and cfg[key] is not None:
      changes[f.name] = cfg[key]
  return base.replace(**changes)


# --- AdaRound (delegates to dqjax.quant.rounding) ----------------------------------------------------------
def _rounding():
  from dqjax.quant import rounding
  return rounding


def init_rounding(qm, paths: Sequence[str]):
  """Give every listed op with a weight quantizer AdaRound logits V that reproduce round-to-nearest under
  hard rounding (h(V) = frac(W/s)); ops that already have V keep it. Split kernels init each half."""
  rnd = _rounding()
  qstate = dict(qm.qstate)
  for path in paths:
    op = qm.plan[path]
    st = qstate.get(path, OpState())
    if op.weight is None or st.rounding is not None:
      continue
    if st.weight is None:
      raise qapply.UncalibratedError(f"op {path!r}: calibrate weights before initialising AdaRound")
    kernel = qapply.effective_kernel(qapply.get_kernel(qm.params, path), st)
    if op.input_split:
      c = op.input_split
      v = jnp.concatenate([rnd.adaround_init(kernel[..., :c, :], st.weight, op.weight),
                           rnd.adaround_init(kernel[..., c:, :], st.weight_split, op.weight)], axis=-2)
    else:
      v = rnd.adaround_init(kernel, st.weight, op.weight)
    qstate[path] = st.replace(rounding=v)
  return qm.replace(qstate=qstate)


# --- losses -------------------------------------------------------------------------------------------
def lp_loss(pred, target, p: float = 2.0) -> jax.Array:
  """BRECQ's reconstruction loss: |pred - target|^p summed over the channel (last) axis, averaged over the
  rest, and summed over the leaves of (pred, target) pytrees (multi-output blocks)."""
  leaves_p = jax.tree_util.tree_leaves(pred)
  leaves_t = jax.tree_util.tree_leaves(target)
  if len(leaves_p) != len(leaves_t):
    raise ValueError(f"lp_loss: prediction has {len(leaves_p)} outputs, target {len(leaves_t)}")
  total = 0.0
  for a, b in zip(leaves_p, leaves_t):
    d = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) ** p
    total = total + (jnp.mean(jnp.sum(d, axis=-1)) if d.ndim >= 2 else jnp.mean(d))
  return total


# --- capture ------------------------------------------------------------------------------------------
def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class Signature:
  """How to rebuild a module call's (args, kwargs) from its captured array leaves (hashable)."""
  treedef: Any
  statics: tuple            # None where a leaf is a captured array


def _split_call(tree):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  arrays = [l for l in leaves if _is_array(l)]
  return arrays, Signature(treedef, tuple(None if _is_array(l) else l for l in leaves))


def join_call(arrays, sig: Signature):
  it = iter(arrays)
  leaves = [next(it) if s is None else s for s in sig.statics]
  return jax.tree_util.tree_unflatten(sig.treedef, leaves)


def capture_fn(model: nn.Module, plan: Plan, in_paths: Sequence[str], *, quantized: bool,
               quantize_acts: bool = False):
  """(jitted `(params, qstate, x, t, cond) -> {path: input array leaves}`, {path: Signature}).

  One compiled forward records the call inputs of every module in `in_paths`: in float (`quantized=False`;
  only the state's equivalent input transforms apply) or quantized as `qstate` says (hard AdaRound
  rounding; activations only with `quantize_acts`). Signatures are filled when the function is traced."""
  sigs: dict = {}
  in_paths = tuple(in_paths)

  def run(params, qstate, x, t, cond):
    ins = {}
    core = qapply.make_interceptor(plan, qstate, t, quantize_acts=quantized and quantize_acts)

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == "__call__":
        path = module_path(context.module)
        if path in in_paths and path not in ins:
          ins[path] = (tuple(args), dict(kwargs))
      return core(next_fun, args, kwargs, context)

    p = qapply.quantized_params(plan, params, qstate) if quantized else params
    with nn.intercept_methods(interceptor):
      model.apply({"params": p}, x, t, cond)
    missing = [q for q in in_paths if q not in ins]
    if missing:
      raise ValueError(f"reconstruction capture: modules {missing} were never called by the model")
    out = {}
    for path, call in ins.items():
      out[path], sigs[path] = _split_call(call)
    return out

  return jax.jit(run), sigs


def _batched(fn, args, n: int, bs: int, pick: Callable = lambda r: r):
  """Run `fn(*args_batch)` over n samples in batches of bs (the last one padded; args with a leading
  sample axis are sliced, None passes through); `pick` selects what is copied to the host."""
  results = []
  for start in range(0, n, bs):
    stop = min(n, start + bs)
    idx = np.arange(start, start + bs).clip(max=n - 1)
    batch = [None if a is None else jax.tree_util.tree_map(lambda v: v[idx], a) for a in args]
    out = pick(fn(*batch))
    results.append(jax.tree_util.tree_map(lambda v: np.asarray(v)[: stop - start], out))
  return jax.tree_util.tree_map(lambda *vs: np.concatenate(vs, 0), *results)


def block_modules(model: nn.Module, params: Any, paths: Sequence[str], example_args) -> dict:
  """Unbound, unnamed copies of the modules at `paths` (same attributes), found by tracing the model.
  Unnamed, two blocks with equal attributes are equal, so their compiled training steps are shared."""
  found: dict = {}
  want = set(paths)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = module_path(context.module)
      if path in want and path not in found:
        found[path] = context.module.clone(parent=None, name=None)
    return next_fun(*args, **kwargs)

  def run(p, *a):
    with nn.intercept_methods(interceptor):
      return model.apply({"params": p}, *a)

  jax.eval_shape(run, params, *example_args)
  missing = sorted(want - set(found))
  if missing:
    raise ValueError(f"block paths {missing} are not modules called by the model")
  return found


# --- running one block -----------------------------------------------------------------------------------
def sub_plan(plan: Plan, prefix: str) -> Plan:
  """The ops under `prefix`, with paths relative to it."""
  ops = []
  for op in plan.ops:
    if under(op.path, prefix):
      ops.append(dataclasses.replace(op, info=dataclasses.replace(op.info, path=relative(op.path, prefix))))
  return Plan(tuple(ops))


def _subtree(params, rel: str):
  """The parameters under `rel`; {} for a module that has none (an attention matmul, a concat)."""
  node = params
  for part in ([] if rel == "" else rel.split("/")):
    node = node.get(part, {})
  return node


def _with_kernel(params, rel: str, kernel):
  if rel == "":
    return {**params, "kernel": kernel}
  head, _, rest = rel.partition("/")
  return {**params, head: _with_kernel(params[head], rest, kernel)}


def block_interceptor(plan: Plan, qstate: dict, t, *, quantize_acts: bool, qdrop_prob: float = 1.0,
                      key=None, record: Sequence[str] = (), records: Optional[dict] = None):
  """The interceptor of a block run on its own: like `transform.apply.make_interceptor` (input transforms,
  activation fake-quant, low-rank branch) plus QDrop's random bypass of activation quantization and the
  recording of module outputs (layer-loss terms, multi-output blocks)."""
  by_path = {op.path: op for op in plan.ops}
  record = set(record)
  counter = [0]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    op = by_path.get(path) if op_kind(context.module) is not None else None
    if op is None:
      out = next_fun(*args, **kwargs)
    else:
      st = qstate.get(path, OpState())
      n = len(op.info.operands)
      xs = qapply.transform_inputs(list(args[:n]), st)
      branch_in = xs[0]
      if quantize_acts and op.acts:
        new = []
        for name, x in zip(op.info.operands, xs):
          xq = qapply.quantize_operand(x, op, st, name, t)
          if qdrop_prob < 1.0 and key is not None and op.act_spec(name) is not None:
            counter[0] += 1
            keep = jax.random.bernoulli(jax.random.fold_in(key, counter[0]), qdrop_prob, x.shape)
            xq = jnp.where(keep, xq, x)
          new.append(xq)
        xs = new
      out = next_fun(*xs, *args[n:], **kwargs)
      if st.lowrank is not None:
        a, b = st.lowrank
        out = out + ((branch_in @ a) @ b).astype(out.dtype)
    if records is not None and path in record and path not in records:
      records[path] = out
    return out

  return interceptor


def run_block(module: nn.Module, plan: Plan, params: Any, qstate: dict, args, kwargs, t, *,
              soft: Sequence[str] = (), quantize_weights: bool = True, quantize_acts: bool = False,
              qdrop_prob: float = 1.0, key=None, record: Sequence[str] = ()):
  """Apply a block's module alone, quantized per its (relative-path) plan and state.

  soft: ops whose AdaRound rounding is soft (rectified sigmoid; training) instead of hard.
  Returns (block output, {recorded path: output}).
  """
  p = params
  if quantize_weights:
    for op in plan.ops:
      st = qstate.get(op.path)
      if op.weight is None or st is None or st.weight is None:
        continue
      k = qapply.effective_kernel(_subtree(params, op.path)["kernel"], st)
      p = _with_kernel(p, op.path, qapply.fake_quant_kernel(k, op, st, adaround_hard=op.path not in soft))
  records: dict = {}
  with nn.intercept_methods(block_interceptor(plan, qstate, t, quantize_acts=quantize_acts,
                                              qdrop_prob=qdrop_prob, key=key, record=record,
                                              records=records)):
    out = module.apply({"params": p}, *args, **kwargs)
  return out, records


# --- trainables ---------------------------------------------------------------------------------------------
def _static_operands(op: OpPlan, st: OpState) -> list[str]:
  names = []
  for name, spec in op.acts:
    if spec.dynamic:
      continue
    names.append(name)
    if name == "input" and op.input_split:
      names.append("input_split")
  return [n for n in names if n in st.acts]


def merge_trainables(qstate: dict, train: dict) -> dict:
  """qstate with V ('v': {path: V}) and activation scales ('s': {path: {operand: scale}}) replaced."""
  new = dict(qstate)
  for path, v in train.get("v", {}).items():
    new[path] = new[path].replace(rounding=v)
  for path, by in train.get("s", {}).items():
    st = new[path]
    acts = dict(st.acts)
    for operand, s in by.items():
      acts[operand] = acts[operand].replace(qp=acts[operand].qp.replace(scale=s))
    new[path] = st.replace(acts=acts)
  return new


def _schedule(kind: str, lr: float, iters: int):
  return optax.cosine_decay_schedule(lr, iters) if kind == "cosine" else optax.constant_schedule(lr)


def _optimizer(groups: Sequence[str], cfg: ReconConfig):
  parts = {"v": optax.adam(_schedule(cfg.schedule_w, cfg.lr_w, cfg.iters)),
           "s": optax.adam(_schedule(cfg.schedule_a, cfg.lr_a, cfg.iters))}
  return optax.multi_transform({k: parts[k] for k in groups}, lambda tree: {k: jax.tree_util.tree_map(
      lambda _: k, v) for k, v in tree.items()})


# --- the loss of one block -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockProblem:
  """Static description of one block's reconstruction (hashable: equal blocks share compiled steps).

  `loss(trainables, frozen, block_inputs, targets)` is pure: trainables = {'v': {op: V}, 's': {op: {operand:
  scale}}}, frozen = {'params': the block's parameter subtree, 'qstate': its ops' states (relative
  paths)}, block_inputs = {'args': captured input leaves, 't': [B] timesteps}, targets = {'out': float
  output(s), 'layers': {op: float output}}.
  """
  module: nn.Module
  plan: Plan                       # relative paths
  sig: Signature
  phase: str
  cfg: ReconConfig
  out_rel: tuple[str, ...] = ()    # recorded outputs forming the loss (() = the block's return value)
  layer_rel: tuple[str, ...] = ()  # ops with layer-loss terms

  def forward(self, train: dict, frozen: dict, block_inputs, *, soft: bool = True, key=None,
              quantize: bool = True):
    qstate = merge_trainables(frozen["qstate"], train)
    args, kwargs = join_call(block_inputs["args"], self.sig)
    out, recs = run_block(self.module, self.plan, frozen["params"], qstate, args, kwargs, block_inputs["t"],
                          soft=tuple(train.get("v", {})) if soft else (), quantize_weights=quantize,
                          quantize_acts=quantize and self.phase != "weights",
                          qdrop_prob=self.cfg.qdrop_prob if soft else 1.0, key=key,
                          record=self.out_rel + self.layer_rel)
    pred = out if not self.out_rel else {p: recs[p] for p in self.out_rel}
    return pred, {p: recs[p] for p in self.layer_rel}

  def loss(self, train: dict, frozen: dict, block_inputs, targets, *, it=0, key=None):
    """(total loss, (reconstruction loss, rounding regulariser))."""
    cfg = self.cfg
    pred, layers = self.forward(train, frozen, block_inputs, key=key)
    rec = lp_loss(pred, targets["out"], cfg.p)
    if self.layer_rel and cfg.layer_loss > 0:
      rec = rec + cfg.layer_loss * sum(lp_loss(layers[p], targets["layers"][p], cfg.p) for p in self.layer_rel)
    reg = jnp.zeros((), jnp.float32)
    if train.get("v") and cfg.round_loss and cfg.round_weight > 0:
      rnd = _rounding()
      it = jnp.asarray(it, jnp.float32)
      beta = rnd.beta_schedule(it, cfg.iters, cfg.warmup, *cfg.b_range)
      lam = rnd.round_loss_weight(it, cfg.iters, cfg.warmup, cfg.round_weight)
      reg = lam * sum(rnd.adaround_regularizer(v, beta) for v in train["v"].values())
    return rec + reg, (rec, reg)


def _mix_inputs(q_args, fp_args, prob: float, key):
  if prob >= 1.0:
    return q_args
  out = []
  for i, (a, b) in enumerate(zip(q_args, fp_args)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      keep = jax.random.bernoulli(jax.random.fold_in(key, i), prob, a.shape)
      out.append(jnp.where(keep, a, b))
    else:
      out.append(a)
  return out


@functools.partial(jax.jit, static_argnames=("problem", "n", "chunk"))
def _train_chunk(problem: BlockProblem, train, opt_state, frozen, data, it0, key, *, n: int, chunk: int):
  """`chunk` Adam steps (a lax.scan) on random mini-batches of the block's cached inputs/targets."""
  cfg = problem.cfg
  opt = _optimizer(tuple(train), cfg)

  def body(carry, i):
    train, opt_state = carry
    it = it0 + i
    k_idx, k_mix, k_drop = jax.random.split(jax.random.fold_in(key, it), 3)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, n)
    pick = lambda a: a[idx]
    args = _mix_inputs([pick(a) for a in data["q"]], [pick(a) for a in data["fp"]], cfg.input_prob, k_mix)
    inputs = {"args": args, "t": pick(data["t"])}
    tgts = jax.tree_util.tree_map(pick, data["targets"])
    (_, (rec, _)), g = jax.value_and_grad(problem.loss, has_aux=True)(train, frozen, inputs, tgts, it=it,
                                                                      key=k_drop)
    upd, new_opt = opt.update(g, opt_state, train)
    new_train = optax.apply_updates(train, upd)
    if "s" in new_train:
      new_train = {**new_train, "s": jax.tree_util.tree_map(lambda s: jnp.maximum(s, 1e-8), new_train["s"])}
    valid = it < cfg.iters
    keep = lambda a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(valid, u, v), a, b)
    return (keep(new_train, train), keep(new_opt, opt_state)), rec

  (train, opt_state), recs = jax.lax.scan(body, (train, opt_state), jnp.arange(chunk))
  return train, opt_state, recs


@functools.partial(jax.jit, static_argnames=("problem",))
def _fp_forward(problem: BlockProblem, frozen, block_inputs):
  pred, layers = problem.forward({}, frozen, block_inputs, soft=False, quantize=False)
  return {"out": pred, "layers": layers}


@functools.partial(jax.jit, static_argnames=("problem", "quantize_acts"))
def _block_error(problem: BlockProblem, frozen, block_inputs, targets, quantize_acts: bool):
  p = dataclasses.replace(problem, phase="acts" if quantize_acts else "weights")
  pred, _ = p.forward({}, frozen, block_inputs, soft=False)
  return lp_loss(pred, targets, 2.0)


# --- one block -------------------------------------------------------------------------------------------------
def _layer_paths(plan: Plan, block: Block, cfg: ReconConfig) -> list[str]:
  """EDA-DM: the block's Conv/Dense layers except the last one called."""
  if cfg.layer_loss <= 0:
    return []
  paths = [op.path for op in plan.ops if under(op.path, block.path) and op.quantized
           and op.info.kind in ("dense", "conv", "conv_transpose")]
  return paths[:-1]


def _trainables(plan: Plan, qstate: dict, block: Block, phase: str) -> dict:
  train: dict = {}
  if phase in ("weights", "joint"):
    v = {relative(p, block.path): qstate[p].rounding for p in block.ops
         if plan[p].weight is not None and p in qstate and qstate[p].rounding is not None}
    if v:
      train["v"] = v
  if phase in ("acts", "joint"):
    s = {}
    for p in block.ops:
      st = qstate.get(p)
      if st is None:
        continue
      names = _static_operands(plan[p], st)
      if names:
        s[relative(p, block.path)] = {n: st.acts[n].qp.scale for n in names}
    if s:
      train["s"] = s
  return train


def _frozen(qm, block: Block) -> dict:
  return {"params": _subtree(qm.params, block.path),
          "qstate": {relative(p, block.path): st for p, st in qm.qstate.items() if under(p, block.path)}}


def _samples(data: CalibData, cfg: ReconConfig):
  x, t, c = data.flat()
  n = x.shape[0]
  if cfg.num_samples is not None and cfg.num_samples < n:
    idx = np.unique(np.round(np.linspace(0, n - 1, cfg.num_samples)).astype(int))
    x, t = x[idx], t[idx]
    c = None if c is None else jax.tree_util.tree_map(lambda a: a[idx], c)
  return x, t, c


def _stable_hash(s: str) -> int:
  h = 0
  for ch in s:
    h = (h * 131 + ord(ch)) % (2 ** 31 - 1)
  return h


class _Session:
  """Cached captures for reconstructing a list of blocks: the float inputs of every block come from one
  compiled forward pass; the quantized-model inputs from one compiled function re-run per block."""

  def __init__(self, qm, blocks: Sequence[Block], x, t, c, cfg: ReconConfig, phase: str):
    self.x, self.t, self.c, self.cfg, self.phase = x, t, c, cfg, phase
    paths = tuple(sorted({b.path for b in blocks}))
    self.modules = block_modules(qm.model, qm.params, paths, (x[:1], t[:1], None if c is None else
                                                            jax.tree_util.tree_map(lambda a: a[:1], c)))
    fp_fn, self.sigs = capture_fn(qm.model, qm.plan, paths, quantized=False)
    self.fp_inputs = _batched(lambda *a: fp_fn(qm.params, qm.qstate, *a), (x, t, c), x.shape[0],
                              cfg.capture_batch)
    self.q_fn = None
    if cfg.asym or cfg.input_prob < 1.0:
      self.q_fn, _ = capture_fn(qm.model, qm.plan, paths, quantized=True, quantize_acts=phase != "weights")

  def problem(self, qm, block: Block, layer_paths=()) -> BlockProblem:
    return BlockProblem(self.modules[block.path], sub_plan(qm.plan, block.path), self.sigs[block.path],
                        self.phase, self.cfg, tuple(relative(p, block.path) for p in block.outputs),
                        tuple(relative(p, block.path) for p in layer_paths))

  def inputs(self, qm, block: Block, quantized: bool):
    if not quantized or self.q_fn is None:
      return self.fp_inputs[block.path]
    return _batched(lambda *a: self.q_fn(qm.params, qm.qstate, *a), (self.x, self.t, self.c), self.x.shape[0],
                    self.cfg.capture_batch, pick=lambda r: r[block.path])

  def targets(self, problem: BlockProblem, frozen: dict, fp_args):
    fn = lambda a, tt: _fp_forward(problem, frozen, {"args": a, "t": tt})
    return _batched(fn, (fp_args, self.t), self.x.shape[0], self.cfg.capture_batch)


def reconstruct_block(qm, block: Block, session: _Session, *, position: str = ""):
  """Learn one block's quantizers; returns (new QModel, (first-chunk loss, last-chunk loss) or None)."""
  cfg, phase = session.cfg, session.phase
  train = _trainables(qm.plan, qm.qstate, block, phase)
  if not train:
    return qm, None
  layer_paths = _layer_paths(qm.plan, block, cfg)
  problem = session.problem(qm, block, layer_paths)
  frozen = _frozen(qm, block)
  fp_args = session.fp_inputs[block.path]
  q_args = session.inputs(qm, block, quantized=True)
  targets = session.targets(problem, frozen, fp_args)
  data = {"q": [jnp.asarray(a) for a in q_args], "fp": [jnp.asarray(a) for a in fp_args],
          "t": jnp.asarray(session.t), "targets": jax.tree_util.tree_map(jnp.asarray, targets)}
  n = int(session.x.shape[0])
  opt_state = _optimizer(tuple(train), cfg).init(train)
  key = jax.random.fold_in(jax.random.key(cfg.seed), _stable_hash(block.path + phase))
  chunk = min(cfg.chunk, cfg.iters)
  bar = tqdm(total=cfg.iters, desc=f"{phase} {position}{block.name or '<model>'}", leave=False,
             disable=not cfg.progress, unit="it")
  first = last = None
  for it0 in range(0, cfg.iters, chunk):
    train, opt_state, recs = _train_chunk(problem, train, opt_state, frozen, data, jnp.asarray(it0, jnp.int32),
                                          key, n=n, chunk=chunk)
    valid = min(chunk, cfg.iters - it0)
    mean = float(np.mean(np.asarray(recs)[:valid]))
    first = mean if first is None else first
    last = mean
    bar.update(valid)
    bar.set_postfix(rec=f"{mean:.4g}")
  bar.close()
  # write the learned arrays back under absolute paths
  qstate = dict(qm.qstate)
  back = {relative(p, block.path): p for p in block.ops}
  for rel, v in train.get("v", {}).items():
    qstate[back[rel]] = qstate[back[rel]].replace(rounding=v)
  for rel, by in train.get("s", {}).items():
    qstate[back[rel]] = merge_trainables({rel: qstate[back[rel]]}, {"s": {rel: by}})[rel]
  return qm.replace(qstate=qstate), (first, last)


def reconstruct(qm, data: CalibData, blocks: Optional[Sequence[Block]] = None, cfg: ReconConfig = ReconConfig(),
                *, phase: str = "weights"):
  """Reconstruct `blocks` (default: `partition(qm.plan)`) in order; returns the new QModel.

  phase: 'weights' (AdaRound V, activations in float), 'acts' (activation scales with hard-rounded weights
  and quantized activations; needs calibrated activations), 'joint' (both at once, EDA-DM).
  The per-block (first, last) training losses are logged in `qm.meta['reconstruction']`.
  """
  if phase not in PHASES:
    raise ValueError(f"reconstruction phase={phase!r} is unknown; accepted values: {', '.join(PHASES)}")
  data = data.validate()
  blocks = list(partition(qm.plan) if blocks is None else blocks)
  if not blocks:
    return qm
  if phase in ("weights", "joint"):
    qm = init_rounding(qm, [p for b in blocks for p in b.ops if qm.plan[p].weight is not None])
  x, t, c = _samples(data, cfg)
  session = _Session(qm, blocks, x, t, c, cfg, phase)
  log = dict(qm.meta.get("reconstruction", {}))
  for i, block in enumerate(blocks):
    qm, losses = reconstruct_block(qm, block, session, position=f"[{i + 1}/{len(blocks)}] ")
    if losses is not None:
      log[f"{phase}:{block.name}"] = losses
  return qm.replace(meta={**qm.meta, "reconstruction": log})


def reconstruction_pass(cfg: ReconConfig, *, phase: str = "weights",
                        blocks: Optional[Callable[[Any], Sequence[Block]]] = None,
                        data_fn: Optional[Callable] = None):
  """Pass: `reconstruct` with blocks from `blocks(qm)` (default: U-Net partition of the plan).
  `data_fn(qm, data)` may substitute the calibration set (e.g. a method's own selection)."""
  if phase not in PHASES:
    raise ValueError(f"reconstruction phase={phase!r} is unknown; accepted values: {', '.join(PHASES)}")

  def run(qm, data: CalibData):
    d = data if data_fn is None else data_fn(qm, data)
    return reconstruct(qm, d, None if blocks is None else blocks(qm), cfg, phase=phase)

  return run


# --- evaluation ---------------------------------------------------------------------------------------------
def block_output_error(qm, data: CalibData, block: Block, *, quantize_acts: bool = False,
                       asym: bool = False, batch: int = 64) -> float:
  """Lp(2) error of a block's (or its `outputs`') quantized output (hard rounding) against float, on float
  inputs (`asym=False`) or on the inputs the quantized model produces. For tests and reports."""
  cfg = ReconConfig(capture_batch=batch, asym=asym)
  x, t, c = data.flat()
  session = _Session(qm, [block], x, t, c, cfg, "acts" if quantize_acts else "weights")
  problem = session.problem(qm, block)
  frozen = _frozen(qm, block)
  targets = session.targets(problem, frozen, session.fp_inputs[block.path])
  args = session.inputs(qm, block, quantized=asym)
  return float(_block_error(problem, frozen, {"args": [jnp.asarray(a) for a in args], "t": jnp.asarray(t)},
                            jax.tree_util.tree_map(jnp.asarray, targets["out"]), quantize_acts))
