"""PTQD (arXiv 2305.10657): CPU-sized defaults; the paper/code values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # base quantizer (the code's BRECQ pipeline): skip/downsample convs float, first/last layers at 8 bits,
  # attention matmuls not quantized; MSE weights (per channel; the code: per tensor) and Lp(2.4) activations
  c.weight_init = "mse"
  c.act_init = "mse"
  c.use_adaround = False            # True: BRECQ/AdaRound block reconstruction (dqjax.calib.reconstruct)
  c.recon_iters = 200
  c.paper_recon_iters = 10000
  c.learn_act_steps = False         # the code also learns activation steps (5000 iters, lr 4e-4)
  # noise statistics: side-by-side FP/quantized ε along fresh FP trajectories
  c.stats_samples = 64
  c.paper_stats_samples = 1024
  c.clip_negative_k = True          # divide by (1 + k) only when k > 0, as the code does
  c.per_channel_bias = True         # bias[t, c]
  c.absorb_variance = True          # variance-schedule calibration (acts when the sampler injects noise)
  # step-aware mixed precision (acts only when the activation bits are below mp_high_bits, e.g. W4A4 -> W4A4/8)
  c.mixed_precision = True
  c.mp_high_bits = 8
  return c
