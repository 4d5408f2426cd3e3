"""Capacity: the deployment as a discrete-event model, checked here, then run at scale.

`python -m loadtests.capacity` (`make capacity`): the model (model.py, SimPy) driven by
the calibration `make bench` measures (service/calibration.py), first against this
machine (validate.py: every cell of a sweep, and the bench's requests per statement),
then fleets of 10, 100 and 1,000 replicas at the planner's shapes and sized naively
(fleets.py). Writes reports/capacity/<timestamp>/ (report.md, capacity.json, PNGs) and
points reports/capacity/latest at it.
"""
