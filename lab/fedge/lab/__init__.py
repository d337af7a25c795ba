"""The demo and the lab around it: ``fedge demo``, the recorded smartwatch data set, the
centralised reference training, a local broker launcher, the EdgeX simulator and core-data
double, container agents, the fleet observer, plots and progress bars.

None of it runs on a device or in the aggregator's pod; a device image is built without this
package (``setup.py``), and the CLI says so when a lab command is asked for there.
"""
