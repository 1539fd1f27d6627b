"""TDQ (arXiv 2306.02316; no public code): CPU-sized defaults."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.weight_init = "mse"
  c.act_init = "mse"               # the static interval the MLP starts from
  c.objective = "quant_error"      # or 'output' (quantized vs float model output)
  c.num_freqs = 8                  # geometric Fourier encoding of t/T
  c.hidden = 64                    # paper [mem]: a few FC layers of width 64
  c.depth = 2
  c.iters = 200
  c.batch_size = 32
  c.lr = 1e-3
  c.seed = 0
  return c
