"""DiTAS (arXiv 2409.07756): CPU-sized defaults; the paper's values in comments."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.num_alphas = 21                 # paper/code: α ∈ {0, 0.05, ..., 1}
  c.group_size = 32                 # code: AsymQuantizer(num_groups=32) (strided); here contiguous along input
  c.lora_rank = 4                   # code: r = 32 for D = 1152 (≈3% of D); 0 disables the LoRA branch
  c.lora_iters = 10                 # code: 10 alternating iterations
  c.reparam = True                  # fold into adaLN / V as sample_merge_TAS.py; fc2 stays online
  c.search_samples_per_step = 8     # code: all recorded inputs of the first 50 steps
  c.search_rows = 4096              # tokens used by each layer's grid search (subsampled, seeded)
  c.seed = 0
  return c
