"""What the tests of several parts share: harnesses, doubles of services that cannot run here
(checked against their specifications), and simulated devices built on fedge.agent.core."""
