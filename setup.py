"""gandl-jax: GAN-DL (StyleGAN2 discriminator features for microscopy) in JAX/Flax."""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent

# TensorFlow serves only tf.data. The CPU build keeps it off TPUs/GPUs and is
# much smaller; it exists for Linux x86_64 (Cloud TPU VMs, most GPU boxes).
_TF_CPU = 'sys_platform == "linux" and platform_machine == "x86_64"'
_TF_FULL = 'sys_platform != "linux" or platform_machine != "x86_64"'
# Tested with apache-beam 2.77.0 and mlcroissant 1.1.1 on Python 3.11.
_BEAM = ["apache-beam>=2.77", "mlcroissant>=1.0.9"]

setup(
    name="gandl-jax",
    version="0.1.0",
    description="GAN-DL: self-supervised StyleGAN2 discriminator embeddings for "
    "fluorescence microscopy, in JAX/Flax (TPU-first).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["gandl_jax", "gandl_jax.*"]),
    install_requires=[
        # Tested with jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8 and
        # orbax-checkpoint 0.12.8 (Python 3.11); checked against jax 0.11's
        # changelog (no removed or deprecated API in use; 0.11 needs Python
        # >= 3.12). No upper bound: no known break.
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        f"tensorflow-cpu>=2.16; {_TF_CPU}",
        f"tensorflow>=2.16; {_TF_FULL}",
        "tensorflow-datasets>=4.9.6",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "scikit-image>=0.25",
        "absl-py>=2.0",
        "pandas>=2.1",
        "pyarrow>=14",
        "matplotlib>=3.8",
        # The JUMP consortium's mAP (phenotypic activity / consistency) with
        # its permutation p-values; brings duckdb, statsmodels and tqdm.
        "copairs>=0.5.5",
        "pillow>=10",
        "tensorboard>=2.16",
    ],
    extras_require={
        # The TFDS builders on Apache Beam (gandl_jax/data/tfds_builder.py) and
        # the `tfds build` command line, which imports mlcroissant.
        "beam": _BEAM,
        # The tests run the Beam builders (tests/data/test_tfds_beam.py).
        "test": ["pytest>=8", "pytest-xdist>=3.5"] + _BEAM,
        # torch: gandl-import (gandl_jax/interop) and the side-by-side benchmarks
        # against stylegan2-ada-pytorch (tools/sg2ada_reference.py); the package
        # itself never imports it. >= 2.6: torch.load(weights_only=True) is
        # safe only from 2.6 on.
        "import": ["torch>=2.6"],
        # libtpu (the one matching jax, ~200 MB): on TPU VMs, and for compiling
        # the phases for TPU topologies on a CPU host (tools/plan_tpu.py,
        # tests/tools/test_tpu_compile.py). Not in `test`: CI skips those tests.
        # Extra names have no "_": pip < 23.3 does not match "a_b" to the
        # "a-b" that setuptools writes, and installs nothing.
        "tpu": ["jax[tpu]"],
    },
    entry_points={
        "console_scripts": [
            "gandl-demo=gandl_jax.cli.demo:run",
            "gandl-synth=gandl_jax.cli.synth:run",
            "gandl-convert=gandl_jax.cli.convert:run",
            "gandl-train=gandl_jax.cli.train:run",
            "gandl-export=gandl_jax.cli.export:run",
            "gandl-evaluate=gandl_jax.cli.evaluate:run",
            "gandl-features=gandl_jax.cli.features:run",
            "gandl-generate=gandl_jax.cli.generate:run",
            "gandl-import=gandl_jax.cli.import_weights:run",
        ],
    },
)
