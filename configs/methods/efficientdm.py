"""EfficientDM (arXiv 2310.03270): CPU-sized defaults; the paper's / code's values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # data-free distillation along FP trajectories (teacher forcing, one update per sampler step)
  c.steps = 200                     # updates (10 epochs of the 20-step sampler)
  c.batch_size = 8                  # trajectories per epoch (CFG doubles the network batch)
  c.pool_size = 64                  # FP trajectories sampled once
  c.order = "trajectory"
  c.reduction = "sum"               # size_average=False in the code
  c.paper_steps = 16000             # 160 epochs x 100 DDIM steps
  c.paper_train_sampler = "DDIM 100 steps, eta=1.0, guidance 1.5 (2 random classes per epoch)"
  # quantizers and initialisation (naive PTQ)
  c.first_last_bits = 8             # time-embedding MLP + conv_in + conv_out: plain 8-bit, no LoRA
  c.weight_init = "minmax"          # channel-wise asymmetric min-max
  c.act_init = "mse"                # LAPQ shrink search, p = 2.4
  c.act_candidates = 80             # 80 shrink steps of 1%
  # QALoRA
  c.lora_rank = 4
  c.paper_lora_rank = 32
  c.lora_lr_divisor = 250.0         # LoRA lr = mean(Delta_w) / divisor, per layer
  c.paper_lora_lr_divisor = 2500.0
  c.lr_weight_scale = 1e-6
  c.lr_act = 5e-4
  c.optimizer = "adamw"
  c.weight_decay = 0.01
  c.schedule = "linear"             # get_linear_schedule_with_warmup(0 warm-up)
  c.merge_lora = True
  c.seed = 0
  return c
