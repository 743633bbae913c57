"""OS glue used by every process: logging, systemd notification, lifecycle."""
