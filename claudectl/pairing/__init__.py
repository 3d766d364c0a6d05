"""
Invites and joining: the invite link, the relay code, the word phrase and
pair codes (:mod:`.codes`, :mod:`.detect`), outstanding invites
(:mod:`.invites`) and the PAKE that turns a short one-time code into a
strong key (:mod:`.pake`).
"""
