"""Bytes between processes: the collective all-to-all over a torch process group (collective.py), the device
and backend a rank uses (devices.py), the HTTP codec (http_codec.py) and the routing-trace file format (trace.py)."""
