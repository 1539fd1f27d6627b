"""PCR (arXiv 2311.06322): CPU-sized defaults (no public code)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.num_stages = 4                  # progressive calibration stages (consecutive groups of steps)
  c.paper_num_stages = "every step"
  c.traj_samples = 16               # quantized/FP trajectories per stage
  c.relax_fraction = 0.1            # share of the sampler calls whose activations are relaxed
  c.relax_bits = 16                 # >= 16: float activations on relaxed steps
  c.stats_samples = 32
  c.weight_init = "mse"
  c.act_init = "mse"
  return c
