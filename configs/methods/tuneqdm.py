"""TuneQDM / MEFT (arXiv 2401.04339): CPU-sized defaults; the paper's / code's values are in paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.num_experts = 4                 # --num_experts 4; expert i = floor(t * N / T)
  c.train_delta_in = True           # --train_delta_in
  c.train_bias = False
  c.train_acts = True               # only when activations are quantized (A < 16): per-expert-range tables
  c.act_init = "mse"
  c.steps = 200
  c.batch_size = 8
  c.pool_size = 64
  c.order = "trajectory"            # one timestep per batch (the expert is chosen per forward)
  c.lr = 3e-4                       # on relative scales (r_out, δ_in start at 1): a 0.03 % step at any bit width
  c.lr_bias = 1e-4                  # absolute (biases are not relative); only with train_bias
  c.lr_act = 1e-5                   # absolute activation step sizes; 1e-4 cost 8-bit fidelity (see the docstring)
  c.paper_steps = 400
  c.paper_lr = 3e-6                 # constant, batch 1, DreamBooth noise-prediction loss
  c.seed = 0
  return c
