"""
``claudectl tui``: a full-screen dashboard of the running relay service.

:mod:`claudectl.tui.clean` and :mod:`claudectl.tui.lines` are plain Python
(no urwid); :mod:`claudectl.tui.feed` is the control-socket client that the
service pushes panel updates to; :mod:`claudectl.tui.app` is the urwid
application on the Twisted reactor.  See ``docs/tui.md``.
"""
