"""The plan: pure functions from a validated lab to ports, MACs, PCI places, paths and argv.

Nothing in this package touches the host, so `qlinkctl plan` and the golden tests need none.
Modules: `identity` (MACs, PCI places), `allocations` (ports and positions remembered between
runs), `paths`, `lab` (`plan_lab`), `argv` (`build_argv`), `render` (the plan as JSON).
"""
