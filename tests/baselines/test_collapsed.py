"""Collapsed DenseNet-121: trained on the training part only (a signal that
exists only in the test part gives chance accuracy), on the SVM protocol's
own rows and split, run by gandl-evaluate. Random weights, 32x32 images."""
import numpy as np
import pytest

from gandl_jax import embeddings, schema
from gandl_jax.baselines import collapsed, densenet
from gandl_jax.data import convert, pipeline, synthetic
from gandl_jax.evaluate import classify, pipeline as ev

RES = 32
CLASSES = sorted([schema.ACTIVE, schema.MOCK])
LR = 1e-2   # both tests: the same compiled step (lr is part of the program)


@pytest.fixture(scope="module")
def backbone():
  return densenet.load_backbone("none", seed=0)


@pytest.fixture(scope="module")
def cfg():
  return collapsed.CollapsedConfig(batch=16, max_epochs=4, patience=4,
                                   learning_rate=LR, val_fraction=0.25)


@pytest.fixture(scope="module")
def runner(backbone, cfg):
  return collapsed.Runner(backbone, cfg)


def _signal_data(n=64, seed=0):
  """Balanced labels; the split of the SVM protocol; noise images whose
  channel 0 carries the label (bright: Active, dark: Mock) in the test part
  only."""
  rng = np.random.default_rng(seed)
  y = np.array(CLASSES * (n // 2))
  tr, te = classify.split_rows(y, classify.ProtocolConfig(seed=seed))
  images = rng.integers(60, 196, (n, RES, RES, 5)).astype(np.uint8)
  bright = y == schema.ACTIVE
  signal = images.copy()
  signal[bright, :, :, 0] = 255
  signal[~bright, :, :, 0] = 0
  test_only = images.copy()
  test_only[te] = signal[te]
  return y, tr, te, test_only, signal


def _balanced(y, pred):
  return float(np.mean([np.mean(pred[y == c] == c) for c in CLASSES]))


def test_signal_only_in_test_part_gives_chance(backbone, cfg, runner):
  y, tr, te, images, signal = _signal_data()
  pred, _, facts = collapsed.fit_predict(images, y, CLASSES, tr, te, backbone,
                                         cfg, runner)
  # The test part's labels flipped: a method that never reads them predicts
  # exactly the same, so the two balanced accuracies sum to 1 (mean: chance).
  y_flip = y.copy()
  y_flip[te] = np.where(y[te] == CLASSES[0], CLASSES[1], CLASSES[0])
  pred_f, _, facts_f = collapsed.fit_predict(images, y_flip, CLASSES, tr, te,
                                             backbone, cfg, runner)
  np.testing.assert_array_equal(pred, pred_f)
  assert facts["val_loss_by_epoch"] == facts_f["val_loss_by_epoch"]
  acc, acc_f = _balanced(y[te], pred), _balanced(y_flip[te], pred_f)
  assert acc + acc_f == pytest.approx(1.0)
  # Other test images: the training is bit-identical too.
  other = images.copy()
  other[te] = 255 - signal[te]
  _, _, facts_o = collapsed.fit_predict(other, y, CLASSES, tr, te, backbone,
                                        cfg, runner)
  assert facts_o["val_loss_by_epoch"] == facts["val_loss_by_epoch"]
  assert facts_o["mix_weights"] == facts["mix_weights"]
  assert facts["n_fit"] + facts["n_val"] == len(tr)
  # Positive control: the same budget learns the signal when it is in the
  # training part, so the chance result above is not a failure to learn.
  pred_s, _, _ = collapsed.fit_predict(signal, y, CLASSES, tr, te, backbone,
                                       cfg, runner)
  print("balanced accuracy: test-only signal", acc, "flipped", acc_f,
        "signal everywhere", _balanced(y[te], pred_s))
  assert _balanced(y[te], pred_s) >= 0.9


def test_balanced_weights_and_loss():
  y = np.array([0, 0, 0, 1])
  w = collapsed.balanced_weights(y, 2)
  np.testing.assert_allclose(w, [4 / 6, 2.0])
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  labels = np.array([0, 1, 0])
  weights = np.array([1.0, 2.0, 0.0], np.float32)
  ce = -np.log(np.exp(logits[np.arange(3), labels]) /
               np.exp(logits).sum(1))
  np.testing.assert_allclose(
      float(collapsed.weighted_ce(logits, labels, weights)),
      (ce * weights).sum() / weights.sum(), rtol=1e-6)


def test_evaluate_runs_it_on_the_svm_split(tmp_path):
  src = synthetic.generate(str(tmp_path / "src"), size=RES, plates=1,
                           wells_per_plate=16, workers=1)
  shards = str(tmp_path / "shards")
  convert.convert("rxrx19a", src, shards, resolution=RES, num_shards=2)
  sites = pipeline.read_sites_index(shards)
  meta = sites.drop(columns=["shard", "position"]).reset_index(drop=True)
  feats = np.random.default_rng(0).normal(size=(len(meta), 8))
  emb_path = str(tmp_path / "emb.parquet")
  embeddings.write(emb_path, meta, feats)
  ccfg = collapsed.CollapsedConfig(data=shards, weights="none", batch=16,
                                   max_epochs=1, learning_rate=LR)
  m = ev.evaluate([ev.EmbeddingSet("embeddings", emb_path)],
                  str(tmp_path / "eval"),
                  tasks=["control", "dose_response"],
                  options=ev.Options(per_task=(
                      collapsed.CollapsedMethod(ccfg),)), log=lambda s: None)
  assert m["names"] == ["embeddings", "densenet_collapsed"]
  svm = m["embeddings"]["embeddings"]["control"]
  col = m["embeddings"]["densenet_collapsed"]["control"]
  assert col["status"] == "ok", col
  for split in ("random", "plate"):
    for key in ("n_test", "test_class_counts", "train_class_counts"):
      assert col[split][key] == svm[split][key], (split, key)
    assert col[split]["training"]["n_fit"] + col[split]["training"][
        "n_val"] == svm[split]["n_train"]
  assert m["embeddings"]["densenet_collapsed"]["dose_response"][
      "status"] == "skipped"
  report = (tmp_path / "eval" / "report.md").read_text()
  assert "sees labels" in report and "random initialisation" in report
  # A site the shards do not hold: a clear error naming the shards.
  with pytest.raises(ValueError, match="not in these shards"):
    collapsed.load_images(shards, ["nope_1_A01_1"])
  # The images come back in the order asked for.
  ids = list(meta["site_id"][:5])[::-1]
  it, _ = pipeline.eval_host_batches(shards, host_batch=len(meta))
  b = next(it)
  pos = {s: i for i, s in enumerate(b["site_id"])}
  np.testing.assert_array_equal(collapsed.load_images(shards, ids),
                                b["image"][[pos[s] for s in ids]])
