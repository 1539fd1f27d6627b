"""EDA-DM (arXiv 2401.04585): CPU-sized defaults; the paper/script values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # TDAC (scripts/calibration.py): weights from density (radius r) and diversity of mid-block features
  c.feature_module = "mid_block/attentions_0"
  c.radius = None                   # paper: 3.0 (CIFAR), 0.3 (LDM); None = median pairwise distance
  c.lam = 1.2                       # CIFAR/ImageNet 1.2, LSUN 1.0, SD 5.0
  c.num_samples = 256
  c.paper_num_samples = 1024
  c.traj_samples = 64
  c.chunk = 8
  c.seed = 0
  # quantizers (QDrop-style MSE search, symmetric weights, first/last layers at 8 bits)
  c.weight_init = "mse"
  c.act_init = "mse"
  c.eight_bit = ("time_embedding/linear_1", "conv_out")
  c.softmax_bits = 8
  c.split_shortcut = True
  # FBR (paper: 5000 iters, batch 32, add_loss 0.8, QDrop p 0.5, lr_w / lr_a per dataset, e.g. LSUN W4A8
  # 1e-2 / 5e-3, CIFAR W4A8 5e-1 / 5e-4; no rounding regulariser)
  c.iters = 100
  c.paper_iters = 5000
  c.fbr_lr_w = 1e-2
  c.fbr_lr_a = 1e-3
  c.fbr_layer_loss = 0.8
  c.fbr_qdrop_prob = 0.5
  c.fbr_input_prob = 0.5
  c.fbr_round_loss = False
  c.fbr_num_samples = 256
  c.fbr_batch_size = 16             # paper 32
  return c
