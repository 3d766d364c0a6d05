"""The composition root: :mod:`claudectl.service.compose` builds the running service."""
