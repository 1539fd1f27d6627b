"""Q-Diffusion (arXiv 2302.04304): CPU-sized defaults; the paper's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # calibration set: steps evenly spaced over the FP trajectory (paper: cali_st=20 steps x cali_n=256)
  c.calib_steps = 10
  c.calib_n = 32
  c.paper_calib_steps = 20
  c.paper_calib_n = 256
  # quantizers
  c.weight_symmetric = False        # per-channel asymmetric weights (UniformAffineQuantizer default)
  c.act_symmetric = False           # --a_sym off
  c.weight_init = "mse"             # 'mse' (LDM/SD scripts) or 'minmax' (DDIM 'max')
  c.act_init = "mse"                # Lp(2.4) grid search
  c.quantize_matmuls = True         # q, k, v and softmax quantizers
  c.softmax_bits = None             # None = activation bits (paper: sm_abit 16 for SD, A bits otherwise)
  c.split_shortcut = True
  c.keep_fp = ()                    # Q-Diffusion keeps nothing in float
  # BRECQ reconstruction (paper: iters_w 20000, batch 32, lambda 0.01, beta 20->2, warmup 0.2, Adam 1e-3;
  # activation steps: iters_a 5000, lr 4e-4, cosine, p 2.4)
  c.iters_w = 100
  c.iters_a = 50
  c.paper_iters_w = 20000
  c.paper_iters_a = 5000
  c.recon_w_lr_w = 1e-2             # larger than the paper's 1e-3 to make up for 100x fewer iterations
  c.recon_w_batch_size = 16          # paper 32; conv backprop dominates on CPU
  c.recon_a_batch_size = 16
  c.recon_w_num_samples = 256
  c.recon_a_lr_a = 4e-4
  c.recon_a_num_samples = 256
  c.learn_act_steps = True
  return c
