"""TFMQ-DM (arXiv 2311.16503): CPU-sized defaults; the paper/code values are in the paper_* fields."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # float layers (code: skip/op/shortcut/downsample convs, time_embed[0], conv_in, conv_out); the time
  # embedding's second layer has quantized weights but float input
  c.keep_fp = (r".*conv_shortcut", r".*downsamplers_\d+/conv", "conv_in", "conv_out", "time_embedding/linear_1")
  c.fp_acts = ("time_embedding/linear_2",)
  c.weight_symmetric = False
  c.act_symmetric = False
  c.softmax_bits = 8
  c.weight_init = "mse"
  c.act_init = "mse"
  # TIAR + BRECQ (paper: 20000 iters, batch 32, lambda 0.01, warmup 0.2)
  c.tiar = True
  c.iters_w = 100
  c.paper_iters_w = 20000
  c.recon_w_lr_w = 1e-2
  c.recon_w_num_samples = 256
  c.recon_w_batch_size = 16         # paper 32
  # FSC: per-timestep tables for the temporal path ('temporal', paper) or every activation ('all', code)
  c.fsc_scope = "temporal"
  c.fsc_method = "mse"              # only for fsc_scope='all' (the temporal path uses exact min/max)
  c.traj_samples = 32
  return c
