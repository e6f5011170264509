"""slm-export: export small language models for on-device runtimes, with parity and latency checks.

Data flows one way: load -> export -> quantize -> validate -> measure -> bundle
(see ``exporter.pipeline``).
"""

__version__ = "0.1.0"
