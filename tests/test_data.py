"""MNIST-5k loading, the fixed split, captions and tokenizer; the zoo's on-disk network format."""
import hashlib
import json
import os

import numpy as np
import pytest

from dqjax.data import mnist
from dqjax.zoo import io


# --- MNIST-5k ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,n", [("train", 4500), ("heldout", 500), ("all", 5000)])
def test_shapes_range_and_class_balance(split, n):
  x, y = mnist.load_mnist(split)
  assert x.shape == (n, 32, 32, 1) and x.dtype == np.float32
  assert y.shape == (n,) and y.dtype == np.int32
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
  # the 2-pixel padding is background
  assert np.all(x[:, :2] == -1.0) and np.all(x[:, :, -2:] == -1.0)


def test_split_is_disjoint_complete_and_pinned():
  idx = mnist.split_indices()
  assert not set(idx["train"]) & set(idx["heldout"])
  np.testing.assert_array_equal(np.sort(np.concatenate([idx["train"], idx["heldout"]])), np.arange(5000))
  # Recomputed from the documented recipe (one rng(0), per class in order 0..9, first 50 held out).
  _, y = mnist.load_mnist("all")
  rng = np.random.default_rng(0)
  held = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:50] for c in range(10)]))
  np.testing.assert_array_equal(idx["heldout"], held)
  # Pinned: a change of the split would silently change every shipped model's train set.
  digest = hashlib.sha1(idx["heldout"].astype(np.int64).tobytes()).hexdigest()
  assert digest == PINNED_HELDOUT_SHA1, digest


PINNED_HELDOUT_SHA1 = "7e89bcbd3fd75a993d70af48440436e07d815283"


def test_loaded_arrays_are_cached_and_read_only():
  a, _ = mnist.load_mnist("heldout")
  b, _ = mnist.load_mnist("heldout")
  assert a is b
  with pytest.raises(ValueError):
    a[0, 0, 0, 0] = 0.0


def test_pixels_match_the_file():
  x, y = mnist.load_mnist("all")
  raw = np.loadtxt(mnist.data_file(), dtype=np.uint8, delimiter=",", max_rows=3)
  np.testing.assert_allclose(x[:3, 2:30, 2:30, 0], raw[:, :-1].reshape(3, 28, 28) / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(y[:3], raw[:, -1])


def test_unknown_split_is_a_clear_error():
  with pytest.raises(ValueError, match="split='test' is unknown; accepted values: train, heldout, all"):
    mnist.load_mnist("test")
  with pytest.raises(ValueError, match="accepted values"):
    mnist.captions("val")


# --- captions and tokenizer ---------------------------------------------------------------------------------
def test_caption_for_and_its_errors():
  assert mnist.caption_for(7, "thick") == "a thick seven"
  assert mnist.caption_for(np.int32(0), "upright") == "a upright zero"
  with pytest.raises(ValueError, match="style='bold' is unknown; accepted values: thin, thick, upright, slanted"):
    mnist.caption_for(1, "bold")
  with pytest.raises(ValueError, match="label=10"):
    mnist.caption_for(10, "thin")


def test_captions_are_deterministic_and_describe_the_image():
  caps = mnist.captions("heldout")
  _, y = mnist.load_mnist("heldout")
  assert caps == mnist.captions("heldout") and len(caps) == 500
  assert [mnist.label_of_caption(c) for c in caps] == list(y)
  words = [c.split()[1] for c in caps]
  assert set(words[0::2]) == {"thin", "thick"} and set(words[1::2]) == {"upright", "slanted"}
  # style words follow the measured statistics: "thick" digits carry more ink than "thin" ones
  x, _ = mnist.load_mnist("heldout")
  mass, slant = mnist.style_features(x)
  thick = np.array([w == "thick" for w in mnist.style_words(x, "thickness")])
  assert mass[thick].min() > mass[~thick].max()
  slanted = np.array([w == "slanted" for w in mnist.style_words(x, "slant")])
  assert slant[slanted].min() > slant[~slanted].max()
  # the thresholds are train medians, so the train split is split in half
  assert abs(np.mean([w == "thick" for w in mnist.style_words(mnist.load_mnist("train")[0], "thickness")]) - 0.5) < 0.01


def test_slant_feature_sees_a_sheared_stroke():
  img = -np.ones((2, 32, 32, 1), np.float32)
  for r in range(6, 26):
    img[0, r, 15:17] = 1.0                     # vertical bar
    img[1, r, 6 + (r - 6) // 2: 8 + (r - 6) // 2] = 1.0   # leaning bar
  _, slant = mnist.style_features(img)
  assert slant[0] < 1e-6 and slant[1] > 0.4


def test_tokenizer():
  tok = mnist.tokenize(["a thick seven", "", "a slanted one"], max_len=4)
  v = mnist.VOCAB
  np.testing.assert_array_equal(tok, [[v.index("a"), v.index("thick"), v.index("seven"), 0],
                                      [0, 0, 0, 0],
                                      [v.index("a"), v.index("slanted"), v.index("one"), 0]])
  assert tok.dtype == np.int32 and mnist.PAD_ID == 0 and v[0] == "<pad>"
  assert mnist.tokenize(mnist.random_captions([3, 4], seed=1), 3).shape == (2, 3)
  np.testing.assert_array_equal(mnist.tokenize(mnist.captions("train")[:50], 4),
                                mnist.tokenize(mnist.captions("train")[:50], 4))
  with pytest.raises(ValueError, match="word 'big' is not in the vocabulary"):
    mnist.tokenize(["a big one"])
  with pytest.raises(ValueError, match="has 3 words; max_len=2"):
    mnist.tokenize(["a thin one"], max_len=2)
  with pytest.raises(TypeError, match="not a single string"):
    mnist.tokenize("a thin one")


def test_random_captions_are_seeded():
  assert mnist.random_captions([1, 2, 3], seed=5) == mnist.random_captions([1, 2, 3], seed=5)
  assert [mnist.label_of_caption(c) for c in mnist.random_captions([1, 2, 3])] == [1, 2, 3]


# --- zoo on-disk format --------------------------------------------------------------------------------------
def _tree():
  rng = np.random.default_rng(0)
  return {"enc": {"conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
                           "bias": np.zeros(4, np.float32)}},
          "scalar": np.float32(0.5), "ints": np.arange(3)}


def test_io_round_trip_keeps_other_files(tmp_path):
  d = str(tmp_path / "net")
  io.save_params(d, _tree(), {"a": 1, "nested": {"b": [1, 2]}})
  with open(os.path.join(d, "README.md"), "w") as f:
    f.write("card")
  io.save_params(d, _tree(), {"a": 2})                       # overwrite in place
  params, config = io.load_params(d)
  assert config == {"a": 2}
  ref = _tree()
  np.testing.assert_array_equal(params["enc"]["conv"]["kernel"], ref["enc"]["conv"]["kernel"])
  assert params["scalar"].shape == () and params["scalar"] == 0.5
  assert params["ints"].dtype == np.float32 and list(params["ints"]) == [0, 1, 2]
  assert sorted(os.listdir(d)) == ["README.md", "config.json", "params.safetensors"]
  assert open(os.path.join(d, "README.md")).read() == "card"
  assert os.listdir(tmp_path) == ["net"]                    # no temporary directories left behind


def test_io_failed_write_leaves_the_previous_network(tmp_path):
  d = str(tmp_path / "net")
  io.save_params(d, _tree(), {"a": 1})
  with pytest.raises(ValueError, match="cannot be written as JSON"):
    io.save_params(d, _tree(), {"a": object()})
  with pytest.raises(TypeError, match="leaf 'x' has dtype <U"):
    io.save_params(d, {"x": np.array(["s"])}, {})
  with pytest.raises(ValueError, match="key 'a/b'"):
    io.save_params(d, {"a/b": np.ones(1)}, {})
  assert io.load_params(d)[1] == {"a": 1}
  assert os.listdir(tmp_path) == ["net"]


@pytest.mark.parametrize("damage,error,match", [
    ("no_dir", FileNotFoundError, "no saved network at .* \\(directory missing\\)"),
    ("no_params", ValueError, "incomplete: params.safetensors is missing"),
    ("no_config", ValueError, "incomplete: config.json is missing"),
    ("garbage_params", ValueError, "is corrupt: params.safetensors cannot be read"),
    ("truncated_params", ValueError, "is corrupt: params.safetensors cannot be read"),
    ("garbage_config", ValueError, "is corrupt: config.json cannot be parsed"),
    ("list_config", ValueError, "is corrupt: config.json holds a list, not a JSON object"),
    ("f16_params", ValueError, "tensor 'w' has dtype float16; expected float32"),
])
def test_io_errors_name_the_file_and_the_problem(tmp_path, damage, error, match):
  d = tmp_path / "net"
  io.save_params(str(d), {"w": np.ones((4, 4))}, {"x": 1})
  p, c = d / io.PARAMS, d / io.CONFIG
  if damage == "no_dir":
    d = tmp_path / "elsewhere"
  elif damage == "no_params":
    p.unlink()
  elif damage == "no_config":
    c.unlink()
  elif damage == "garbage_params":
    p.write_bytes(b"garbage")
  elif damage == "truncated_params":
    p.write_bytes(p.read_bytes()[:-10])
  elif damage == "garbage_config":
    c.write_text("{not json")
  elif damage == "list_config":
    c.write_text(json.dumps([1, 2]))
  elif damage == "f16_params":
    from safetensors.numpy import save_file
    save_file({"w": np.ones(2, np.float16)}, str(p))
  with pytest.raises(error, match=match):
    io.load_params(str(d))
