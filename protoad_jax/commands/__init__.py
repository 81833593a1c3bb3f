"""The commands behind ``protoad <command>`` and ``scripts/<command>.py``: flags and main of each."""
