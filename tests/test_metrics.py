"""The survey's metrics (ADM evaluator semantics), paired fidelity, costs, the shipped evaluator and the
FID Inception port (shapes and weight loading only)."""
import numpy as np
import pytest

from dqjax import metrics
from dqjax.metrics import cost, inception


# --- Fréchet distance ---------------------------------------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
  mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
  s1, s2 = np.diag([4.0, 9.0]), np.diag([1.0, 1.0])
  # |Δμ|² + Σ (σ1 − σ2)² = 9 + 4 + (2−1)² + (3−1)² = 18
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(18.0, rel=1e-12)
  assert metrics.frechet_distance(0.0, 4.0, 3.0, 1.0) == pytest.approx(10.0, rel=1e-12)
  with pytest.raises(ValueError, match="shapes disagree"):
    metrics.frechet_distance(mu1, s1, np.zeros(3), np.eye(3))


def test_fid_of_a_set_with_itself_is_zero_and_symmetric():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
  b = 1.2 * a + 0.3 * rng.normal(size=a.shape)     # FID ≈ 0.04·tr Σ (covariance scaled by 1.44)
  scale = np.trace(np.cov(a, rowvar=False))
  assert abs(metrics.fid(a, a)) <= 1e-6 * scale
  assert metrics.fid(a, b) > 1e-3 * scale
  assert metrics.fid(a, b) == pytest.approx(metrics.fid(b, a), rel=1e-6)
  assert metrics.sfid(a, b) == metrics.fid(a, b)


def test_distance_to_reference_from_features_equals_the_statistics_form():
  """The N × N form (fewer samples than dimensions) is the same number as the D × D eigenvalue form."""
  rng = np.random.default_rng(2)
  ref = rng.normal(size=(500, 96)) @ rng.normal(size=(96, 96)) / 10
  mu, sigma = metrics.statistics(ref)
  for n in (8, 64, 300):                     # 300 > 96: the statistics path
    f = rng.normal(size=(n, 96)) * 0.8 + 0.2
    assert metrics.frechet_distance_to_reference(f, mu, sigma) == pytest.approx(
        metrics.frechet_distance(*metrics.statistics(f), mu, sigma), rel=1e-6)
  near, far = (metrics.frechet_distance_to_reference(x[:50], mu, sigma) for x in (ref, f))
  assert near < far
  with pytest.raises(ValueError, match="features .*mu .*sigma"):
    metrics.frechet_distance_to_reference(f[:, :10], mu, sigma)


def test_rank_deficient_covariances_fall_back_instead_of_failing():
  """Fewer samples than dimensions: ADM may raise on the complex sqrtm; we warn and use the symmetric form."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(20, 64)), rng.normal(size=(30, 64)) + 0.5
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    d = metrics.frechet_distance(*metrics.statistics(a), *metrics.statistics(b), method="sqrtm")
  # |Δμ|² alone is about 64 · 0.25 = 16; the covariance terms are positive for these sample sizes
  assert np.isfinite(d) and d > 16
  assert metrics.fid(a, b) == pytest.approx(d, rel=1e-6)            # the default eigenvalue form agrees
  big1, big2 = rng.normal(size=(300, 40)), rng.normal(size=(300, 40)) * 1.3
  stats = (*metrics.statistics(big1), *metrics.statistics(big2))
  assert metrics.frechet_distance(*stats) == pytest.approx(metrics.frechet_distance(*stats, method="sqrtm"),
                                                           rel=1e-7)
  with pytest.raises(ValueError, match="method="):
    metrics.frechet_distance(*stats, method="svd")
  # the symmetric trace agrees with sqrtm on a well-conditioned pair
  from dqjax.metrics.fid import _trace_sqrt_symmetric
  s1, s2 = np.cov(rng.normal(size=(500, 8)), rowvar=False), np.cov(rng.normal(size=(500, 8)), rowvar=False)
  from scipy import linalg
  assert _trace_sqrt_symmetric(s1, s2) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-9)


# --- Inception score -----------------------------------------------------------------------------------------
def test_inception_score_extremes_and_splits():
  assert metrics.inception_score(np.zeros((50, 10))) == pytest.approx(1.0, abs=1e-12)
  confident = 100.0 * np.eye(10)[np.arange(200) % 10]
  assert metrics.inception_score(confident) == pytest.approx(10.0, rel=1e-9)
  # split A: all class 0 (IS 1); split B: 5 classes evenly (IS 5) → mean 3
  two = np.concatenate([100.0 * np.eye(10)[np.zeros(50, int)], 100.0 * np.eye(10)[np.arange(50) % 5]])
  assert metrics.inception_score(two, splits=2) == pytest.approx(3.0, rel=1e-9)
  assert metrics.inception_score(two, split_size=50) == pytest.approx(3.0, rel=1e-9)
  assert metrics.inception_score(two, splits=1) > 3.0
  with pytest.raises(ValueError, match="splits=0"):
    metrics.inception_score(two, splits=0)


# --- precision / recall ---------------------------------------------------------------------------------------
def test_precision_recall_by_hand():
  real = np.arange(5.0)[:, None]            # radii (k=1): squared distance 1 to the nearest neighbour
  fake = np.array([[0.5], [10.0]])          # k=1 radii: 9.5² = 90.25 each
  p, r = metrics.precision_recall(real, fake, k=1)
  assert p == 0.5                           # only 0.5 lies within a real sphere (0.25 ≤ 1)
  assert r == 1.0                           # every real point is within 90.25 of 0.5
  np.testing.assert_allclose(metrics.manifold_radii(real, k=2), [4, 1, 1, 1, 4])
  with pytest.raises(ValueError, match="k=5 must lie in"):
    metrics.manifold_radii(real, k=5)


def test_precision_recall_identical_sets_and_disjoint_sets():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 16))
  assert metrics.precision_recall(a, a) == (1.0, 1.0)
  assert metrics.precision_recall(a, a + 100.0) == (0.0, 0.0)
  # batching does not change the answer
  b = a + 0.5 * rng.normal(size=a.shape)
  assert metrics.precision_recall(a, b, batch=7) == metrics.precision_recall(a, b)


def test_conditional_accuracy():
  logits = np.eye(4)[[0, 1, 2, 3]]
  assert metrics.conditional_accuracy(logits, np.array([0, 1, 2, 0])) == 0.75
  with pytest.raises(ValueError, match="labels"):
    metrics.conditional_accuracy(logits, np.zeros(3))


# --- paired fidelity ------------------------------------------------------------------------------------------
def _ssim_brute_force(a, b, data_range=2.0):
  """Wang et al.'s SSIM written out window by window (11×11 Gaussian, σ=1.5, valid positions)."""
  g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5 ** 2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  vals = []
  for n in range(a.shape[0]):
    for i in range(a.shape[1] - 10):
      for j in range(a.shape[2] - 10):
        x, y = a[n, i:i + 11, j:j + 11, 0], b[n, i:i + 11, j:j + 11, 0]
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy, cxy = (w * x * x).sum() - mx ** 2, (w * y * y).sum() - my ** 2, (w * x * y).sum() - mx * my
        vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
  return float(np.mean(vals))


def test_ssim_matches_the_windowed_definition():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (2, 14, 13, 1))
  b = np.clip(a + 0.3 * rng.normal(size=a.shape), -1, 1)
  assert metrics.ssim(a, b) == pytest.approx(_ssim_brute_force(a, b), abs=1e-12)
  assert metrics.ssim_map(a, b).shape == (2, 4, 3, 1)
  assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
  # anti-correlated structure at equal local means scores below 0 (for zero-mean a, SSIM(a, −a) is
  # positive: the luminance and structure terms are both negative)
  assert metrics.ssim(1 + a, 1 - a) < 0
  with pytest.raises(ValueError, match="at least 11×11"):
    metrics.ssim(a[:, :8], b[:, :8])
  with pytest.raises(ValueError, match="same shape"):
    metrics.ssim(a, b[:1])


def test_psnr_and_trajectory_mse():
  a = np.zeros((3, 8, 8, 1))
  assert metrics.psnr(a, a) == float("inf")
  assert metrics.psnr(a, a + 0.1) == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-12)   # 26.02 dB
  assert metrics.psnr(a, a + 0.1, data_range=1.0) == pytest.approx(20.0, rel=1e-12)
  ta = np.zeros((4, 2, 3))
  tb = np.arange(4.0)[:, None, None] * np.ones((4, 2, 3))
  np.testing.assert_allclose(metrics.trajectory_mse(ta, tb), [0, 1, 4, 9])
  with pytest.raises(ValueError, match="same shape"):
    metrics.trajectory_mse(ta, tb[:3])


# --- costs ------------------------------------------------------------------------------------------------------
def test_costs_on_a_hand_computed_network():
  conv_macs = cost.macs_of_conv((3, 3), 4, 8, (16, 16))
  assert conv_macs == 9 * 4 * 8 * 256 == 73728
  assert cost.macs_of_conv(3, 4, 8, 16, groups=2) == conv_macs // 2
  dense_macs = cost.macs_of_dense(64, 32, positions=10)
  assert dense_macs == 20480
  ops = [cost.OpCost("conv", conv_macs, 288, w_bits=8, a_bits=8), cost.OpCost("dense", dense_macs, 2048)]
  assert cost.bops(ops) == 73728 * 64 + 20480 * 1024 == 25690112
  # 288·8 + 2048·32 bits of kernels, 40 other params at 32 bits
  assert cost.model_size_mb(ops, 40) == pytest.approx((288 * 8 + 2048 * 32 + 40 * 32) / 8 / 1e6, rel=1e-15)
  fp = [cost.OpCost("conv", conv_macs, 288)]
  w8a8 = [cost.OpCost("conv", conv_macs, 288, 8, 8)]
  w4a8 = [cost.OpCost("conv", conv_macs, 288, 4, 8)]
  assert cost.bops(fp) / cost.bops(w8a8) == 16 and cost.bops(fp) / cost.bops(w4a8) == 32
  with pytest.raises(ValueError, match="w_bits=0 must lie in 1..64"):
    cost.OpCost("x", 1, 1, w_bits=0)
  with pytest.raises(ValueError, match="groups=3 must divide"):
    cost.macs_of_conv(3, 4, 8, 16, groups=3)


# --- the shipped evaluator -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def heldout():
  from dqjax.data import mnist
  return mnist.load_mnist("heldout")


@pytest.fixture(scope="module")
def heldout_features(heldout):
  from dqjax.metrics import evaluator
  return evaluator.load_evaluator()(heldout[0])


def test_evaluator_accuracy_and_feature_shapes(heldout, heldout_features):
  from dqjax.metrics import evaluator
  x, y = heldout
  f = heldout_features
  assert f["pool"].shape[0] == f["spatial"].shape[0] == 500
  assert f["logits"].shape == (500, evaluator.NUM_CLASSES)
  assert f["pool"].ndim == 2 and f["spatial"].shape[1] % evaluator.SPATIAL_CHANNELS == 0
  acc = metrics.conditional_accuracy(f["logits"], y)
  assert acc >= 0.97, acc
  # batching (with a padded last batch) does not change the features
  g = evaluator.load_evaluator()(x[:7])
  np.testing.assert_allclose(g["pool"], f["pool"][:7], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="images must be NHWC"):
    evaluator.load_evaluator()(x[:, :28])


def test_fid_grows_monotonically_with_noise(heldout):
  from dqjax.metrics import evaluator
  x, _ = heldout
  ref = evaluator.reference()
  feats = evaluator.load_evaluator()
  rng = np.random.default_rng(0)
  noise = rng.normal(size=x.shape).astype(np.float32)
  fids, sfids = [], []
  for sigma in (0.0, 0.1, 0.25, 0.5, 1.0):
    f = feats(np.clip(x + sigma * noise, -1, 1))
    fids.append(metrics.frechet_distance_to_reference(f["pool"], ref["mu"], ref["sigma"]))
    sfids.append(metrics.frechet_distance_to_reference(f["spatial"], ref["mu_s"], ref["sigma_s"]))
  assert all(a < b for a, b in zip(fids, fids[1:])), fids
  assert all(a < b for a, b in zip(sfids, sfids[1:])), sfids
  assert fids[-1] > 20 * fids[0]


def test_evaluate_samples_on_real_and_noise(heldout):
  x, y = heldout
  real = metrics.evaluate_samples(x, y)
  assert set(real) == {"fid", "sfid", "is", "precision", "recall", "cond_acc"}
  assert real["cond_acc"] >= 0.97 and real["is"] > 8.0
  assert real["precision"] > 0.8 and real["recall"] > 0.5
  noise = metrics.evaluate_samples(np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32))
  assert "cond_acc" not in noise
  assert noise["fid"] > 20 * real["fid"] and noise["sfid"] > 5 * real["sfid"]
  assert noise["precision"] < 0.1 and noise["recall"] < 0.1
  with pytest.raises(ValueError, match="labels must be"):
    metrics.evaluate_samples(x, y[:3])


# --- FID Inception port ------------------------------------------------------------------------------------------
def test_inception_output_shapes():
  """ADM's feature sizes: pool_3 2048, mixed_6/conv[..., :7] 17·17·7 = 2023, 1008 logits (eval_shape only)."""
  assert inception.output_shapes(1) == {"pool": (1, 2048), "spatial": (1, 2023), "logits": (1, 1008)}
  assert inception.output_shapes(2, (64, 48, 3))["pool"] == (2, 2048)
  # the trunk is the 2015-12-05 graph: 94 conv+BN layers and the 1008-way classifier
  names = inception.inception_param_names()
  assert len(names) == 94 * 5 + 2 and "Mixed_6d.branch1x1.conv.weight" in names
  n = sum(int(np.prod(s)) for s in inception.param_shapes().values())
  assert n == 23_885_392


def test_inception_weight_loading_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  state, expected = {}, {}
  for path, shape in inception.param_shapes().items():
    name = inception._torch_name(path)
    value = rng.normal(size=shape).astype(np.float32)
    expected[path] = value
    if path[-1] == "kernel" and len(shape) == 4:
      state[name] = value.transpose(3, 2, 0, 1)      # HWIO → OIHW
    elif path[-1] == "kernel":
      state[name] = value.T
    else:
      state[name] = value
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(3)
  np.savez(tmp_path / "w.npz", **state)
  params = inception.load_inception_params(str(tmp_path / "w.npz"))
  for path, value in expected.items():
    node = params
    for k in path:
      node = node[k]
    np.testing.assert_array_equal(node, value)
  # a graph without BN γ (the TF original) loads with γ = 1
  no_gamma = {k: v for k, v in state.items() if not k.endswith(".bn.weight")}
  p2 = inception.convert_state_dict(no_gamma)
  np.testing.assert_array_equal(p2["Mixed_7c"]["branch_pool"]["bn"]["scale"], np.ones(192))
  bad = dict(state)
  del bad["fc.bias"]
  bad["fc.weight"] = bad["fc.weight"][:1000]
  bad["extra.weight"] = np.ones(1)
  with pytest.raises(ValueError, match="1 missing .*fc.bias.*1 with wrong shapes .*fc.weight.*1 unexpected .*extra"):
    inception.convert_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="no FID Inception weights"):
    inception.load_inception_params(str(tmp_path / "none.npz"))
  (tmp_path / "w.bin").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown extension"):
    inception.load_inception_params(str(tmp_path / "w.bin"))


def test_tf1_bilinear_resize_and_preprocessing():
  import jax.numpy as jnp
  x = np.random.default_rng(0).uniform(size=(1, 4, 5, 1)).astype(np.float32)
  out = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(x), 8))
  # TF1 (half_pixel_centers=False): output (i, j) samples input (i·4/8, j·5/8), clamped at the edge
  def ref(i, j):
    sy, sx = i * 4 / 8, j * 5 / 8
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    y1, x1 = min(y0 + 1, 3), min(x0 + 1, 4)
    fy, fx = sy - y0, sx - x0
    img = x[0, :, :, 0]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bot * fy
  expected = np.array([[ref(i, j) for j in range(8)] for i in range(8)])
  np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6, atol=1e-6)
  # preprocessing: [-1, 1] → uint8 levels → (x − 128)/128, gray repeated to RGB, 299×299
  img = jnp.asarray(np.stack([-np.ones((32, 32, 1)), np.ones((32, 32, 1))]).astype(np.float32))
  pre = np.asarray(inception.preprocess(img))
  assert pre.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(pre[0], -1.0)
  np.testing.assert_allclose(pre[1], 127 / 128, rtol=1e-6)       # float32 resize of a constant
  with pytest.raises(ValueError, match="1 or 3 channels"):
    inception.preprocess(jnp.zeros((1, 8, 8, 2)))


def test_reference_cache_round_trip_and_corrupt_file(tmp_path, monkeypatch, capsys):
  """The reference is cached per machine; a cached file returns the computed arrays bit for bit, and an
  unreadable one is recomputed and rewritten (not an error)."""
  from dqjax.metrics import evaluator
  calls = []

  def fake_compute(path, x):
    calls.append(path)
    r = np.random.default_rng(len(calls))
    return {k: r.normal(size=(3, 3)) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")}

  monkeypatch.setattr(evaluator, "_compute_reference", fake_compute)
  monkeypatch.setenv(evaluator.REFERENCE_CACHE_ENV, str(tmp_path))
  first = evaluator.reference.__wrapped__()
  (cached,) = tmp_path.iterdir()
  again = evaluator.reference.__wrapped__()
  assert len(calls) == 1 and all(np.array_equal(first[k], again[k]) for k in first)
  cached.write_bytes(b"not an npz")
  third = evaluator.reference.__wrapped__()
  assert len(calls) == 2 and "unreadable" in capsys.readouterr().out
  with np.load(cached) as f:
    assert np.array_equal(f["sigma_s"], third["sigma_s"])
  monkeypatch.setenv(evaluator.REFERENCE_CACHE_ENV, "off")
  evaluator.reference.__wrapped__()
  assert len(calls) == 3 and [p.name for p in tmp_path.iterdir()] == [cached.name]
