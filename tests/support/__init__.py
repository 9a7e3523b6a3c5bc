"""Test infrastructure the suite and the benchmark share: fakes, apps, processes, a clock."""
