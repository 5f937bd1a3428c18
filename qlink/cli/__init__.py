"""qlinkctl: the command line (`main.py`), its stdlib client of the control API
(`client.py`) and the terminal side of `console` (`terminal.py`)."""
