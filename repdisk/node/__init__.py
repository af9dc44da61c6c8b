"""The node layer: the state machine, the control commands and status, and the
primary/secondary orchestration between the core and the edges."""
