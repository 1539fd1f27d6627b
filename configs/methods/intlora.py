"""IntLoRA (arXiv 2410.21759): CPU-sized defaults; the paper's / code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.variant = "mul"                 # 'mul' (IntLoRA-MUL) or 'shift' (IntLoRA-SHIFT)
  c.rank = 4
  c.vmc_alpha = 1.5
  c.lora_pattern = r".*/(to_q|to_k|to_v|to_out_0)"   # attention projections
  c.act_quant = True                # --use_activation_quant (per-tensor MSE)
  c.steps = 200
  c.batch_size = 8
  c.pool_size = 64
  c.order = "trajectory"
  c.lr = 1e-3
  c.paper_lr = 6e-5                 # constant, 2000 steps, batch 1, DreamBooth with prior preservation
  c.paper_steps = 2000
  c.seed = 0
  return c
