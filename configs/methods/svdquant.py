"""SVDQuant (arXiv 2411.05007): CPU-sized defaults; the paper's values in comments."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.rank = 8                        # paper: 32 (FLUX / PixArt widths >= 1152); dit-mnist width is 96
  c.group_size = 32                 # paper: 64 (int4) / 16 (nvfp4); 64 does not divide 96
  c.num_grids = 20                  # paper: GridSearch num_grids 20 -> 39 (α, β) candidates
  c.lowrank_in_search = True        # paper: allow_low_rank = true
  c.lowrank_iters = 10              # paper: num_iters 100 with early_stop
  c.adaln_weight_only = True        # paper: extra_wgts (adaLN / norm linears weight-only)
  c.keep_fp = ("embed", "first_last")   # paper skips: embed, proj_in/proj_out (first/last)
  c.search_samples_per_step = 8     # paper: 128 calibration prompts
  c.search_rows = 4096
  c.lowrank_rows = 2048
  c.seed = 0
  return c
