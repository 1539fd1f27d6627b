"""HQ-DiT (arXiv 2405.19751): CPU-sized defaults; the paper's values in comments (no public code)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.rotation = "block_hadamard"      # paper: Hadamard; 96 is no power of two -> block-diagonal (3 x 32); '' = off
  c.format_search = True             # per-layer format (E2M1 vs E1M2=int4 narrow at 4 bits) by quant MSE
  c.keep_fp = ("embed",)             # timestep/class embedders float; attention matmuls float
  c.candidates = 100                 # clipping shrink-grid size
  c.search_samples_per_step = 4
  c.search_rows = 4096
  c.batch_size = None
  c.seed = 0
  return c
