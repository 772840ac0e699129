r"""gandl-demo: the whole GAN-DL pipeline on built-in synthetic data.

  gandl-demo --workdir runs/demo
  gandl-demo --workdir runs/demo-tfds --converter tfds

Synthetic RxRx19a + RxRx1 -> shards -> train -> export -> evaluate, ending
with DIR/report/report.md. Re-running reuses finished stages.
"""
from absl import app, flags

from gandl_jax import cli
from gandl_jax import demo

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage writes.")
_SIZE = flags.DEFINE_integer("size", 64, "Edge of the synthetic site images.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
_DIFFICULTY = flags.DEFINE_string(
    "difficulty", demo.DEFAULT_DIFFICULTY, "Synthetic mode: easy, hard or "
    "hard2 (gandl-synth --difficulty; docs/data.md).")
_CLASSICAL = flags.DEFINE_bool("classical", True, "Also evaluate classical "
                               "(CellProfiler-style) features.")
_DENSENET = flags.DEFINE_bool(
    "densenet", True, "Also evaluate the concatenated DenseNet-121 baseline "
    "(docs/baselines.md).")
_DENSENET_WEIGHTS = flags.DEFINE_string(
    "densenet_weights", demo.DEFAULT_DENSENET_WEIGHTS,
    "DenseNet-121 weights: none (random init, the offline default; the report "
    "names it so), imagenet (downloaded by Keras once) or a Keras weights "
    "file.")
_CONVAE = flags.DEFINE_bool(
    "convae", True, "Also train the demo-sized convolutional autoencoder for "
    "the GAN's budget and evaluate its bottleneck (docs/baselines.md).")
_CONVERTER = flags.DEFINE_enum(
    "converter", "gandl-convert", demo.CONVERTERS,
    "gandl-convert, or tfds: the TFDS builders (Apache Beam with the [beam] "
    "extra); training and export read either.")
flags.mark_flags_as_required(["workdir"])


def demo_command() -> int:
  out = demo.run_demo(_WORKDIR.value, size=_SIZE.value, seed=_SEED.value,
                      converter=_CONVERTER.value, difficulty=_DIFFICULTY.value,
                      classical=_CLASSICAL.value, densenet=_DENSENET.value,
                      densenet_weights=_DENSENET_WEIGHTS.value,
                      convae=_CONVAE.value)
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
  app.run(main)


if __name__ == "__main__":
  run()
