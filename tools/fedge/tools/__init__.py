"""Production tools behind the ``fedge`` command: the broker configuration (``fedge broker
config``), keys and the device registry (``fedge keys``, ``enroll``, ``revoke``), EdgeX
provisioning and the EdgeX bus tap. Each is imported by the CLI only when its command runs."""
