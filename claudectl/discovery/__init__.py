"""
LAN discovery: claudectl's ``CCTL{json}`` UDP beacon (:mod:`.beacon`) and
the Twisted announcer and scanner that send and collect it (:mod:`.protocol`).
"""
