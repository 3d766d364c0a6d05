"""claudectl relay & hive mind: a Twisted implementation."""

__version__ = "0.1.0"

#: The claudectl protocol generation we interoperate with (sent as ``version``).
COMPAT_VERSION = "0.64.0"
