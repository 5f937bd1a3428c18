"""Driving real guests from outside qlink, for tests, benchmarks and the demo: their serial
consoles (`serial.py`) and the CLOS demo (`demo.py`). Not part of the product package."""
