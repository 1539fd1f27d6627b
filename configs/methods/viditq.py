"""ViDiT-Q (arXiv 2406.02540): CPU-sized defaults; the paper's values in comments."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.balance = True                   # static-dynamic channel balancing (v2)
  c.alpha = "search"                 # v2: hand-tuned per layer regex (e.g. 0.3 for PixArt blocks.26.ff); or a float
  c.num_alphas = 9                   # search grid 0.1 .. 0.9
  c.rotation = "block_hadamard"      # v2: QuaRot random Hadamard (size C_in); 'kron' | 'random' | 'hadamard'
  c.balance_pattern = ".*"           # v2 applies it to regex-selected layers only
  c.quantize_matmuls = False         # attention matmuls float (set True for per-token dynamic QK / SV)
  c.keep_fp = ("embed", "adaln", "first_last")   # code remain_fp: embedders, adaLN, final layer
  c.mp_fraction = 0.2                # share of each metric group raised to mp_bits (paper: W4A8-MP plans)
  c.mp_bits = 8
  c.alignment_pattern = r".*(attn2/.*|norm1/linear|norm1/emb/.*|proj_out_1|time_emb_proj|time_embedding/.*)"
  c.mp_samples_per_step = 8          # paper: generated videos scored by CLIP / VQA / flow
  c.search_samples_per_step = 8
  c.search_rows = 4096
  c.seed = 0
  return c
