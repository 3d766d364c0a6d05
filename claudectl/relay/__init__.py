"""The relay: TCP + PSK auth + NDJSON + heartbeats."""
