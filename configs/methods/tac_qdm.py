"""TaC-QDM / TAC-Diffusion (arXiv 2407.03917): CPU-sized defaults (no public code)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.ner = True                      # noise estimation reconstruction (channel-wise K_t)
  c.mask_keep = 0.5                 # fraction of elements (largest relative distortion) in the masked loss
  c.ibc = True                      # input bias correction
  c.ibc_sequential = True           # bias of step t measured with the earlier corrections in place
  c.stats_samples = 64
  c.weight_init = "mse"
  c.act_init = "mse"
  c.use_adaround = False
  return c
