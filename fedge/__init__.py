"""The ``fedge`` command line and the demo's glue (data sets, local reference training).

The product's parts are the ``agent``, ``aggregator`` and ``protocol`` packages; this package
only wires them to a CLI and imports each lazily, so ``fedge agent ...`` on a device never
loads TensorFlow.
"""

__version__ = "0.1.0"
