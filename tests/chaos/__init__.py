"""The chaos harness (issue 17), Jepsen's way: a deployment of several gateway processes
on a real redis-server, clients asking overlapping ids, evicting and crawling, faults on
a seeded schedule, a ledger of every upstream call kept by the simulator, and a checker
that holds each cross-process promise against it. `python -m tests.chaos` or `make chaos`.
"""
