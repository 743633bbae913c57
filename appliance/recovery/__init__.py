"""Going back in time with the log history ([0014], [0085], [0086], [0123],
[0156]): programs whose T logs can be run again, reading the history,
point-in-time restore plans, re-running with a corrected program.

Pure library code, shared by the controller (restore, cancel, history,
batch mode's rewind), the client library (``db.run``, ``db.rerun``) and the
CLI; it starts no process.
"""
