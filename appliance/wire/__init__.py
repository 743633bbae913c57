"""What travels on the appliance's stream sockets; framing lives in :mod:`.framing`."""
