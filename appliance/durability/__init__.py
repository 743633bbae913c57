"""Durability on disk: log files, checkpoints, cold start ([durability]).

Shared memory survives a controller, not a reboot or a power cut. With a
``[durability]`` section the controller also keeps, in ``dir``:

- **log files** (:mod:`.logfiles`): every batch it publishes as one
  checksummed record — a primary's change-log entries (the A/B/T logs of
  whole transactions, as the replication agent reads them), a secondary's
  applied stream and block copies — written and forced by a thread of the
  controller (group commit: one fdatasync for every record that queued
  while the previous one ran);
- **checkpoints** (:mod:`.checkpoint`): every block at one pinned version,
  written by another thread while commits go on;
- and at a start without segments, the **cold start** (:mod:`.coldstart`):
  the newest valid checkpoint, then the log after it.

The format of both kinds of file is :mod:`.records`. The controller's side
(when commits wait, status, the checkpoint request) is
appliance/controller/durable.py. Nothing here starts a process.
"""
