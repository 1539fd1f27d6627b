"""QuEST (arXiv 2402.03666): CPU-sized defaults; the paper's / code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.pool_size = 64                  # FP trajectories (the code caches 64 FP inputs/outputs per timestep)
  c.batch_size = 8
  # base (Q-Diffusion): weights by MSE search; base_recon_iters > 0 runs BRECQ AdaRound first
  c.weight_init = "mse"
  c.base_recon_iters = 0
  c.paper_base_recon_iters = 20000
  c.act_init = "minmax"             # --a_sym --a_min_max (+ running stat EMA 0.95)
  # stage 1: time-embedding layers (pd_optimize_timeembed), timestep by timestep
  c.steps_emb = 100
  c.paper_steps_emb = "300 epochs x 64 samples per timestep (batch 1, grad. accumulation 4)"
  c.lr_emb = 1e-4
  c.paper_lr_emb = 1e-5
  c.lr_emb_act = 1e-5
  # stage 2: attention-related layers + all non-embedding activation steps (pd_optimize_timewise)
  c.steps_attn = 200
  c.paper_steps_attn = "20 epochs x all timesteps"
  c.lr_attn = 1e-4
  c.paper_lr_attn = 1e-5
  c.lr_act = 1e-4
  c.seed = 0
  return c
