"""Data: readers of the raw trees (rxrx.py: RxRx19a / RxRx1; loaddata.py:
CellProfiler LoadData CSVs; imagefile.py: what both share), TFRecord
conversion (convert.py), the TFDS builders on Apache Beam (tfds_builder.py;
tfds_rxrx19a.py, tfds_rxrx1.py), the tf.data input pipeline (pipeline.py)
and the synthetic RxRx19a / RxRx1 (synthetic/).

Kept import-free so that the readers load without TensorFlow.
"""
