"""APQ-DM (CVPR 2024): CPU-sized defaults."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.num_groups = 4                 # timestep groups, one activation table entry each
  c.calib_steps = 10               # steps chosen by MMD matching (at least one per group)
  c.traj_samples = 32              # FP trajectories regenerated for grouping/selection (with an env)
  c.weight_init = "mse"
  c.act_init = "mse"
  return c
