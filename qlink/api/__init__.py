"""The control API: HTTP + JSON on a unix socket (`app.py`), the console hub
(`consoles.py`), the logs endpoint (`logs.py`) and packet capture (`capture.py`)."""
