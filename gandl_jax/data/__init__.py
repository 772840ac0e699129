"""Data: synthetic RxRx19a/RxRx1 (synthetic.py), the public tree reader
(reader.py), TFRecord conversion (convert.py), the TFDS builder
(tfds_rxrx19a.py) and the tf.data input pipeline (pipeline.py).

Kept import-free so that `gandl_jax.data.reader` loads without TensorFlow.
"""
