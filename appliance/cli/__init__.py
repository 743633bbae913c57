"""The ``appliance`` command (operator CLI; it also starts the processes)."""
