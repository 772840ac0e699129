r"""gandl-demo: the whole GAN-DL pipeline on the built-in synthetic data.

  gandl-demo --workdir runs/demo
  gandl-demo --workdir runs/demo-tfds --converter tfds

  synthetic RxRx19a + RxRx1  ->  TFRecord shards (gandl-convert, or the TFDS
  builders on Beam with converter="tfds")  ->  train configs/demo.py
  ->  export D embeddings (trained, and the same D at initialization)
  ->  the baselines (classical features, DenseNet-121, the ConvAE)
  ->  evaluate every set side by side  ->  DIR/report/{report.md,
      metrics.json, figures/}

Each stage records completion in DIR/stages/<stage>.done; re-running reuses
finished stages (training itself resumes from its last checkpoint). Training
stopped by SIGTERM is not complete: the demo stops there (summary reason
'preempted', `gandl-demo` exits 143) and the next run resumes it.

From Python: `run_demo(workdir, ...)`. Importing this module defines no
flags (`run` defines them), so the experiment scripts in tools/ reuse its
stages (`Stages`, `demo_config`, `save_initial_model`, `baseline_sets`,
`headline`) next to their own flags.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import ml_collections
from absl import flags, logging
from jax.sharding import Mesh

from gandl_jax import checkpoint
from gandl_jax import cli
from gandl_jax import config as config_lib
from gandl_jax import io as gio
from gandl_jax import sharding
from gandl_jax.data import convert, synthetic
from gandl_jax.inference import api
from gandl_jax.inference import export
from gandl_jax.train import loop as train_loop
from gandl_jax.train.steps import Trainer

NAMED_COMPOUNDS = ("Remdesivir (GS-5734)", "GS-441524")
CONVERTERS = ("gandl-convert", "tfds")
# The synthetic mode the demo runs on: the biology only in morphology, so
# per-channel intensity alone cannot solve the tasks (docs/data.md).
DEFAULT_DIFFICULTY = "hard"
TRAINED = "GAN-DL (trained D)"
BASELINE = "untrained D (random init)"
CLASSICAL = "classical features"
# The paper's DenseNet-121 baseline. Offline, the demo has no ImageNet
# weights: its default is a random initialisation, named as such.
DEFAULT_DENSENET_WEIGHTS = "none"
CONVAE = "ConvAE (pixel L2)"


class Preempted(Exception):
  """A training stage stopped by SIGTERM (checkpoint saved; rerun resumes)."""

  def __init__(self, stage: str, summary: Dict[str, Any]):
    super().__init__(f"{stage} stopped by SIGTERM")
    self.stage, self.summary = stage, summary


def demo_config() -> ml_collections.ConfigDict:
  """configs/demo.py's model and schedule (kept in the library so the
  installed `gandl-demo` needs no checkout).

  No `conv_clamp`: the demo computes in float32, and the reference turns the
  clamp off with full precision (train.py `--fp32`: conv_clamp = None); the
  paper configs (bfloat16 in the 4 highest resolutions) clamp at 256.
  """
  config = config_lib.base_config()
  config.model = config_lib.model_config(
      resolution=32, z_dim=64, w_dim=64,
      channel_base=1024,   # 4..16: 64 feature maps, 32: 32
      channel_max=64, mbstd_group_size=4)
  config.num_bf16_res = 0   # float32 throughout
  config_lib.demo_schedule(config)
  config.probe_every_kimg = 0.5   # the report's probe curve
  config.loss.r1_gamma = 0.1
  config.ema.half_life_kimg = 0.5
  return config


class Stages:
  """Completion markers: DIR/stages/<name>.done holds a JSON summary."""

  def __init__(self, workdir: str, log: Callable[[str], None]):
    self.dir = os.path.join(workdir, "stages")
    os.makedirs(self.dir, exist_ok=True)
    self.log = log

  def run(self, name: str, fn: Callable[[], Dict[str, Any]],
          complete: Callable[[Dict[str, Any]], bool] = lambda s: True
          ) -> Dict[str, Any]:
    """Runs `fn` unless its marker exists; writes the marker only when
    `complete(summary)` holds."""
    path = os.path.join(self.dir, f"{name}.done")
    if os.path.exists(path):
      self.log(f"[{name}] already done (delete {path} to redo)")
      with open(path, encoding="utf-8") as f:
        return json.load(f)
    self.log(f"[{name}] ...")
    t0 = time.time()
    summary = dict(fn() or {})
    summary["seconds"] = round(time.time() - t0, 1)
    if not complete(summary):
      self.log(f"[{name}] stopped before completion after "
               f"{summary['seconds']:.0f} s; rerun to continue")
      return summary
    gio.write_json(path, summary)
    self.log(f"[{name}] done in {summary['seconds']:.0f} s")
    return summary


def save_initial_model(config: ml_collections.ConfigDict, mesh: Mesh,
                       workdir: str) -> str:
  """Saves the discriminator and generator training starts from (same
  config and seed) as WORKDIR/checkpoints/0: the untrained baseline that
  shows what training bought. Returns the step directory."""
  tr = Trainer(config, mesh)
  state = jax.device_get(tr.init_state(config.seed))
  path = checkpoint.save_model(
      checkpoint.checkpoint_dir(workdir), 0, state.model_variables(),
      {"model": config.model.to_dict(), "step": 0, "kimg": 0.0,
       "source": "initialization (untrained)"})
  return str(path)


def densenet_set_name(weights: str) -> str:
  """The report's name of the concatenated DenseNet-121 set: it says which
  weights (random ones are a control, not the paper's baseline)."""
  from gandl_jax.baselines import densenet  # pylint: disable=import-outside-toplevel
  if weights in densenet.RANDOM_ALIASES:
    return "DenseNet-121 concat (random init)"
  if weights == densenet.WEIGHTS_IMAGENET:
    return "DenseNet-121 concat (ImageNet)"
  return f"DenseNet-121 concat ({os.path.basename(weights)})"


def baseline_sets(stages: "Stages", data: Dict[str, str], emb_dir: str, *,
                  classical: bool = True, densenet: bool = True,
                  densenet_weights: str = DEFAULT_DENSENET_WEIGHTS,
                  convae: bool = True, convae_kimg: float = 2.0,
                  convae_seed: int = 0,
                  mesh: Optional[Mesh] = None,
                  datasets: Tuple[str, ...] = ("rxrx19a", "rxrx1"),
                  ) -> List[Tuple[str, str]]:
  """Computes (or reuses, per stage) the non-GAN embedding sets of every
  dataset in `data` ({dataset: shards}) into EMB_DIR/<tag>_<dataset>.parquet
  and returns their (report name, tag): the classical (CellProfiler-style)
  features and the concatenated DenseNet-121 (weights `densenet_weights`:
  imagenet, a weights file, or none = random init, recorded in the files'
  `gandl.weights`), and the convolutional autoencoder's bottleneck (the
  demo-sized ConvAE trained for `convae_kimg` on the first dataset's shards
  into EMB_DIR/../convae; raises `Preempted` if SIGTERM stops that training).
  The demo and tools/experiment_training_benefit.py share this, so both
  compare the same sets."""
  # pylint: disable=import-outside-toplevel
  sets = []
  if classical:
    def do_classical():
      from gandl_jax.baselines import run as baselines_run
      return {d: baselines_run.compute_embeddings(
          "classical", data[d], os.path.join(emb_dir, f"classical_{d}.parquet"),
          progress_every_s=60.0).as_dict() for d in datasets}
    stages.run("classical", do_classical)
    sets.append((CLASSICAL, "classical"))
  if densenet:
    def do_densenet():
      from gandl_jax.baselines import densenet as densenet_lib
      from gandl_jax.data import pipeline
      backbone = densenet_lib.load_backbone(densenet_weights)
      out = {}
      for d in datasets:
        res = int(pipeline.read_dataset_info(data[d])["resolution"])
        # Below Keras' 32x32 minimum (tests' tiny shards) the sites are
        # resized up; the files record the input size (`gandl.input`).
        size = None if res >= densenet_lib.MIN_SIZE else densenet_lib.MIN_SIZE
        out[d] = densenet_lib.export_concat(
            data[d], os.path.join(emb_dir, f"densenet_{d}.parquet"),
            backbone=backbone, mesh=mesh, overwrite=True, image_size=size,
            progress_every_s=60.0)
      return out
    stages.run("densenet", do_densenet)
    sets.append((densenet_set_name(densenet_weights), "densenet"))
  if convae:
    from gandl_jax.baselines.convae import config as convae_config
    from gandl_jax.baselines.convae import train as convae_train
    from gandl_jax.data import pipeline
    first = data[datasets[0]]
    res = int(pipeline.read_dataset_info(first)["resolution"])
    train_dir = os.path.join(os.path.dirname(emb_dir), "convae")
    config = convae_config.demo_config(first, resolution=res)
    config.seed = int(convae_seed)
    trained = stages.run(
        "convae_train", lambda: convae_train.train(
            config, train_dir, total_kimg=convae_kimg, mesh=mesh),
        complete=lambda s: s.get("reason") != "preempted")
    if trained.get("reason") == "preempted":
      raise Preempted("convae_train", trained)
    stages.run("convae", lambda: {d: export.export_embeddings(
        train_dir, data[d], os.path.join(emb_dir, f"convae_{d}.parquet"),
        mesh=mesh, overwrite=True).as_dict() for d in datasets})
    sets.append((CONVAE, "convae"))
  return sets


# The headline's columns: (label, task, split, metric) of the report's
# summary table. Plate splits (held-out plates, the honest estimate) except
# RxRx1, whose plates each hold one cell type (no plate split exists).
def probe_lines(train_dir: str) -> Tuple[List[str], str]:
  """The probe curve of the GAN's training: (the report's section, the
  headline's line); ([], '') when the probe was off."""
  from gandl_jax.train import probe  # pylint: disable=import-outside-toplevel
  curve = probe.read_curve(train_dir)
  if not curve:
    return [], ""
  section = [
      "## The probe during training", "",
      "Balanced accuracy of linear SVMs on D's `fc` features of a fixed set "
      "of untreated Mock and Active sites (the probe plates, whole plates "
      "held out), at every `probe_every_kimg` of training (metrics.jsonl). "
      "One probe is noisy (about 0.1 from probe to probe on 160 sites): "
      "read the trend, not single values; a curve that rises and then falls "
      "means training wore away what D had learned (docs/results.md).", "",
      *probe.curve_lines(curve), ""]
  line = "probe Mock/Active during training (kimg: balanced accuracy): " + (
      ", ".join(f"{r['kimg']:g}: {r[probe.CONTROL]:.3f}" for r in curve
                if r.get("kimg") is not None and probe.CONTROL in r))
  return section, line


def headline(metrics: Dict[str, Any]) -> List[str]:
  """The headline: each set's balanced accuracies with their 95% intervals
  (held-out plates resampled where the task has a plate split), each set
  minus the first on the same test sites ("no difference" where the interval
  holds 0), then the planted rescuers each set recovered. The EC50 rank
  correlation over a few planted compounds has no interval that means
  anything: it stays in the report's planted-truth section."""
  from gandl_jax.evaluate import compare, report  # pylint: disable=import-outside-toplevel
  lines = compare.headline_lines(metrics)
  hits = []
  for name, res in metrics.get("embeddings", {}).items():
    v = report.summary_value(res, "truth", None, "hits_found")
    if v is not None:
      hits.append(f"{name} {v}")
  if hits:
    lines.append("planted rescuers recovered: " + ", ".join(hits))
  return lines


def run_demo(workdir: str, size: int = 64, seed: int = 0,
             config: Optional[ml_collections.ConfigDict] = None,
             log: Callable[[str], None] = logging.info,
             mesh: Optional[Mesh] = None,
             converter: str = "gandl-convert",
             difficulty: str = DEFAULT_DIFFICULTY,
             classical: bool = True, densenet: bool = True,
             densenet_weights: str = DEFAULT_DENSENET_WEIGHTS,
             convae: bool = True) -> Dict[str, Any]:
  """Runs (or resumes) every stage; returns {'reason': 'finished' or
  'preempted' (training stopped by SIGTERM), 'report': path, ...}.

  `mesh` defaults to all devices (training and export). `converter`:
  "gandl-convert" (shards under DIR/shards) or "tfds" (the TFDS builders,
  on Beam when installed, into DIR/tfds; training and export read it).
  `difficulty`: the synthetic mode (gandl-synth --difficulty); `classical`,
  `densenet`: evaluate the classical (CellProfiler-style) features and the
  concatenated DenseNet-121 (weights `densenet_weights`; offline default:
  random init, named so in the report) as more sets; `convae`: train the
  demo-sized ConvAE for the GAN's budget and evaluate its bottleneck
  (`baseline_sets`)."""
  if converter not in CONVERTERS:
    raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = config or demo_config()
  mesh = mesh or sharding.make_mesh()
  res = int(config.model.resolution)
  stages = Stages(workdir, log)
  raw = os.path.join(workdir, "raw")
  shards = {d: os.path.join(workdir, "shards", d) for d in ("rxrx19a", "rxrx1")}
  emb = os.path.join(workdir, "embeddings")
  t_start = time.time()

  def make_data():
    roots = {d: synthetic.generate(raw, dataset=d, size=size, seed=seed,
                                   difficulty=difficulty)
             for d in ("rxrx19a", "rxrx1")}
    return {"roots": roots}
  roots = stages.run("synthetic", make_data)["roots"]

  def make_shards():
    if converter == "tfds":
      from gandl_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
      out = {d: tfds_builder.build(d, roots[d], os.path.join(workdir, "tfds"), res)
             for d in ("rxrx19a", "rxrx1")}
      return {"paths": {d: out[d]["path"] for d in out}, **out}
    return {d: convert.convert(d, roots[d], shards[d], res,
                               workers=max(1, (os.cpu_count() or 1)))
            for d in ("rxrx19a", "rxrx1")}
  converted = stages.run("convert", make_shards)
  data = converted.get("paths") or {
      d: os.path.join(shards[d], "*.tfrecord") for d in ("rxrx19a", "rxrx1")}

  config.data.path = data["rxrx19a"]
  train_dir = os.path.join(workdir, "train")
  trained = stages.run(
      "train", lambda: train_loop.train(config, train_dir, mesh=mesh),
      complete=lambda s: s.get("reason") != "preempted")
  if trained.get("reason") == "preempted":
    return {"reason": "preempted", "report": None, "metrics": None,
            "headline": [], "seconds": round(time.time() - t_start, 1),
            "stages": trained}

  stages.run("init_checkpoint", lambda: {"checkpoint": save_initial_model(
      config, mesh, os.path.join(workdir, "init"))})

  def do_export():
    out = {}
    for tag, ckpt in (("trained", train_dir),
                      ("init", os.path.join(workdir, "init"))):
      model = api.load(ckpt)   # loaded and compiled once for both datasets
      for d in ("rxrx19a", "rxrx1"):
        path = os.path.join(emb, f"{tag}_{d}.parquet")
        out[f"{tag}_{d}"] = export.export_model(
            model, data[d], path, batch=64,
            checkpoint=ckpt, mesh=mesh).as_dict()
    return out
  stages.run("export", do_export)

  try:
    extra = baseline_sets(stages, data, emb, classical=classical,
                          densenet=densenet, densenet_weights=densenet_weights,
                          convae=convae, convae_kimg=float(config.total_kimg),
                          convae_seed=int(config.seed), mesh=mesh)
  except Preempted as e:
    return {"reason": "preempted", "report": None, "metrics": None,
            "headline": [], "seconds": round(time.time() - t_start, 1),
            "stages": e.summary}

  report_dir = os.path.join(workdir, "report")
  section, probe_line = probe_lines(train_dir)   # read once, used twice

  def do_evaluate():
    from gandl_jax import evaluate  # pylint: disable=import-outside-toplevel
    metrics = evaluate.evaluate(
        [evaluate.EmbeddingSet(
            TRAINED, os.path.join(emb, "trained_rxrx19a.parquet"),
            os.path.join(emb, "trained_rxrx1.parquet"),
            metadata=os.path.join(roots["rxrx19a"], "metadata.csv"),
            rxrx1_metadata=os.path.join(roots["rxrx1"], "metadata.csv")),
         evaluate.EmbeddingSet(BASELINE,
                               os.path.join(emb, "init_rxrx19a.parquet"),
                               os.path.join(emb, "init_rxrx1.parquet"))] +
        [evaluate.EmbeddingSet(
            name, os.path.join(emb, f"{tag}_rxrx19a.parquet"),
            os.path.join(emb, f"{tag}_rxrx1.parquet")) for name, tag in extra],
        report_dir,
        truth=os.path.join(roots["rxrx19a"], "synthetic_truth.csv"),
        compounds=NAMED_COMPOUNDS, log=log)
    report_path = os.path.join(report_dir, "report.md")
    if section:
      with open(report_path, encoding="utf-8") as f:
        text = f.read()
      gio.write_text(report_path, text.rstrip("\n") + "\n\n" +
                     "\n".join(section))
    return {"report": report_path, "headline": headline(metrics)}
  summary = stages.run("evaluate", do_evaluate)
  with open(os.path.join(report_dir, "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  return {"reason": "finished",
          "report": os.path.join(report_dir, "report.md"),
          "metrics": metrics,
          "headline": headline(metrics) + ([probe_line] if probe_line else []),
          "seconds": round(time.time() - t_start, 1),
          "stages": summary}


# ------------------------------------------------------------------ command


def define_flags() -> None:
  """gandl-demo's flags (defined by `run`, not on import)."""
  flags.DEFINE_string("workdir", None, "Where every stage writes.")
  flags.DEFINE_integer("size", 64, "Edge of the synthetic site images.")
  flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
  flags.DEFINE_string(
      "difficulty", DEFAULT_DIFFICULTY, "Synthetic mode: easy, hard or "
      "hard2 (gandl-synth --difficulty; docs/data.md).")
  flags.DEFINE_bool("classical", True, "Also evaluate classical "
                    "(CellProfiler-style) features.")
  flags.DEFINE_bool(
      "densenet", True, "Also evaluate the concatenated DenseNet-121 baseline "
      "(docs/baselines.md).")
  flags.DEFINE_string(
      "densenet_weights", DEFAULT_DENSENET_WEIGHTS,
      "DenseNet-121 weights: none (random init, the offline default; the "
      "report names it so), imagenet (downloaded by Keras once) or a Keras "
      "weights file.")
  flags.DEFINE_bool(
      "convae", True, "Also train the demo-sized convolutional autoencoder "
      "for the GAN's budget and evaluate its bottleneck (docs/baselines.md).")
  flags.DEFINE_enum(
      "converter", "gandl-convert", CONVERTERS,
      "gandl-convert, or tfds: the TFDS builders (Apache Beam with the "
      "[beam] extra); training and export read either.")
  flags.mark_flags_as_required(["workdir"])


def demo_command() -> int:
  f = flags.FLAGS
  out = run_demo(f.workdir, size=f.size, seed=f.seed, converter=f.converter,
                 difficulty=f.difficulty, classical=f.classical,
                 densenet=f.densenet, densenet_weights=f.densenet_weights,
                 convae=f.convae)
  if out["reason"] == "preempted":
    print("GAN-DL demo stopped by SIGTERM during training (checkpoint "
          "saved); rerun the same command to resume.")
    return cli.EXIT_PREEMPTED
  print("\n=== GAN-DL demo finished in "
        f"{out['seconds'] / 60:.1f} min ===")
  for line in out["headline"]:
    print("  " + line)
  print(f"Report: {out['report']}")
  return cli.EXIT_OK


def main(argv):
  cli.no_arguments(argv)
  cli.run("gandl-demo", demo_command)


def run():
  define_flags()
  cli.start(main)


if __name__ == "__main__":
  run()
