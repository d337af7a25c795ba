"""fedge's device side: reads sensor data, fine-tunes a TFLite model with LiteRT, sends updates.

Must stay small enough for an ARM board: imports LiteRT (or tflite-runtime), numpy and
``protocol``, **never TensorFlow** (a test enforces this) and never ``aggregator``.
"""
