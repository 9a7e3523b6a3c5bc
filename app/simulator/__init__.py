"""A stand-in for Freelancer's users API: demo mode, tests and the benchmark use it."""

from app.simulator.app import SimulatorConfig, SimulatorState, create_simulator_app

__all__ = ["SimulatorConfig", "SimulatorState", "create_simulator_app"]
