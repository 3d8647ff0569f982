"""edge-ptychonn: live PtychoNN phase reconstruction for PvaPy HPC streaming.

The core library (this package) has no PvaPy processor code and imports no
heavy optional library at import time; engines and processors build on it.
"""

__version__ = "0.1.0"
