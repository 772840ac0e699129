"""Data: synthetic RxRx19a/RxRx1 (synthetic.py), the public tree reader
(reader.py), TFRecord conversion (convert.py), the TFDS builders on Apache
Beam (tfds_builder.py; tfds_rxrx19a.py, tfds_rxrx1.py) and the tf.data input
pipeline (pipeline.py).

Kept import-free so that `gandl_jax.data.reader` loads without TensorFlow.
"""
