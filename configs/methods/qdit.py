"""Q-DiT (arXiv 2406.17343): CPU-sized defaults; the paper's values in comments."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.search = True
  c.candidates = (8, 16, 32, 48, 96)   # paper: {32, 64, 128, 192, 288} for width 1152 (scaled to width 96)
  c.min_mean_group = 32.0              # paper: mean(g) >= 128 (constraint); seed genome: all-128 (here all-32)
  c.initial_group = 32                 # group size before the search (and with search=False)
  c.population = 16                    # paper: 50
  c.epochs = 4                         # paper: 10
  c.top_k = 4                          # paper: 10
  c.mutations = 6                      # paper: 25 (per-gene probability 0.1)
  c.crossovers = 6                     # paper: 25
  c.mutate_prob = 0.1
  c.fitness_samples_per_step = 8       # proxy fitness: denoiser output MSE (paper: FID of 800 images)
  c.weight_method = "minmax"           # code: RTN 'max' (GPTQ optional, not implemented)
  c.seed = 0
  return c
