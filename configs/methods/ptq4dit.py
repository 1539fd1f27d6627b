"""PTQ4DiT (arXiv 2405.16005): CPU-sized defaults; the paper's values in comments."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.kinds = ("qkv", "proj", "fc1")     # paper: CSB on qkv, proj, fc1 (fc2 follows a GELU: no exact fold)
  c.ssc = True                         # Spearman-ρ salience calibration
  c.ssc_unit = "sample"                # code: per sample of the init batch; paper text: per timestep ('step')
  c.temperature = 1.0                  # η = softmax(−ρ / temperature)
  c.ssc_samples_per_step = None        # paper: 4 per selected timestep (init batch of 100); None = all
  c.reparam = True                     # fold λ into adaLN shift/scale rows and V (paper); False = online divide
  c.w_symmetric = False                # code: per-channel asymmetric weights
  c.weight_method = "mse"              # code: best of 3 percentiles by L2; here the L2 shrink search
  c.act_method = "mse"
  c.act_p = 2.4
  c.candidates = 100
  c.quantize_matmuls = True            # q, k, v and softmax quantizers (QuantDiTBlock)
  c.softmax_bits = 8                   # code: sm_abit = 8
  c.keep_fp = ()                       # code quantizes every layer; e.g. ('embed', 'adaln', 'first_last')
  c.batch_size = None
  c.recon_iters = 0                    # paper: 20000 per block (BRECQ + AdaRound); CPU default: off
  c.recon_batch = 32                   # paper: 32 (256 px)
  c.recon_samples = None
  return c
