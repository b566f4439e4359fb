"""Jetson deployment and fleet device-calibration updates: signed manifests
(deploy/manifest.py), the device's model store (deploy/store.py), the update agent
(deploy/agent.py) and ``panorama fleet`` (deploy/cli.py). The GPU check scripts beside
them run as scripts, not as part of this package."""
